"""What ``check-config`` and ``serve --print-config`` add to loading the settings.

- An error is named where its value came from: a CLI flag (``--port``), a ``GATEWAY_``
  environment variable (``GATEWAY_TIMEOUTS__IDLE``), or else the YAML path (``timeouts.idle``).
- An unknown key gets the closest known key of its section (``did you mean `max_in_flight`?``).
- Secrets the config names by environment variable (every ``*_env`` field, such as
  ``auth.jwt.secret_env``) are listed when that variable is unset, so a CI job without secrets
  can still check everything else.
- The effective settings print as YAML with secrets masked.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from gateway.config import ConfigError, Settings

ENV_PREFIX = "GATEWAY_"
ENV_DELIMITER = "__"
# `user:password@` in a URL (redis://:pw@host, http://u:pw@proxy): the password is masked.
_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@")
# A password in a URL's query string (redis-py and libpq read `?password=`): masked too.
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|secret|token)=)[^&#]*", re.IGNORECASE)
MASK = "**********"

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class SecretVar:
    """A secret the config reads from the environment: ``key`` names the variable ``env``."""

    key: str  # dotted path of the *_env field, e.g. "auth.jwt.secret_env"
    env: str  # the variable it names, e.g. "GATEWAY_JWT_SECRET"


def explain(exc: ConfigError, environ: Mapping[str, str], flags: Mapping[Loc, str]) -> str:
    """The error's lines, each naming where the bad value came from.

    ``flags`` maps a settings path to the CLI flag that set it (``("server", "port"): "--port"``);
    flags win over the environment, which wins over the file (gateway/config.py). An error that
    is not a validation error (a missing file, bad YAML, a part that could not be built) is
    returned as its own text.
    """
    cause = exc.__cause__
    if not isinstance(cause, ValidationError):
        return str(exc)
    env = {k.upper(): k for k in environ}
    lines = []
    for err in cause.errors():
        loc: Loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc:
            message = "unknown key" + _suggestion(loc)
        where = _source(loc, env, flags)
        if where is None:
            lines.append(f"{path or '<root>'}: {message}")
        else:
            lines.append(f"{where} (sets {path}): {message}")
    return "\n".join(lines)


def _source(loc: Loc, env_upper: Mapping[str, str], flags: Mapping[Loc, str]) -> str | None:
    """The flag or environment variable that set the value at ``loc``; None when it is the file's."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in flags:
            return flags[loc[:n]]
    for n in range(len(loc), 0, -1):
        if any(isinstance(p, int) for p in loc[:n]):
            continue  # list items have no variable of their own: GATEWAY_BACKENDS sets the list
        name = ENV_PREFIX + ENV_DELIMITER.join(str(p) for p in loc[:n]).upper()
        if name in env_upper:
            return f"environment variable {env_upper[name]}"
    return None


def _suggestion(loc: Loc) -> str:
    """``; did you mean `x`?`` for an unknown key, or the section's keys when none is close."""
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{close[0]}`?"
    return "; known keys: " + ", ".join(known)


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The settings model of the section at ``loc`` (``("backends", 0)`` → BackendSettings)."""
    tp: Any = Settings
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            if get_origin(tp) is not list:
                return None
            tp = get_args(tp)[0]
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part)
            if field is None:
                return None
            tp = field.annotation
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` → ``X``."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _unwrap(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def secret_vars(settings: Settings) -> list[SecretVar]:
    """Every environment variable the settings name for a secret (the values of ``*_env`` keys)."""
    return [SecretVar(key, value) for key, value in _env_fields(settings, "")]


def _env_fields(model: BaseModel, prefix: str) -> Iterator[tuple[str, str]]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if name.endswith("_env") and isinstance(value, str):
            yield key, value
        elif isinstance(value, BaseModel):
            yield from _env_fields(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _env_fields(item, f"{key}.{i}.")
        elif isinstance(value, dict):
            for k, item in value.items():
                if isinstance(item, BaseModel):
                    yield from _env_fields(item, f"{key}.{k}.")


def unset_secret_vars(settings: Settings, environ: Mapping[str, str]) -> list[SecretVar]:
    """The secrets whose variable is unset or empty here (``serve`` reads them the same way)."""
    return [v for v in secret_vars(settings) if not environ.get(v.env)]


def describe(settings: Settings) -> str:
    """The effective settings as YAML; secrets and URL passwords print as ``**********``."""
    import yaml

    data = settings.model_dump(mode="json")  # SecretStr fields dump as '**********'
    return yaml.safe_dump(_mask_urls(data), sort_keys=False)


def _mask_urls(value: Any) -> Any:
    if isinstance(value, str):
        value = _URL_PASSWORD.sub(rf"\1:{MASK}@", value)
        return _QUERY_PASSWORD.sub(rf"\1{MASK}", value) if "://" in value else value
    if isinstance(value, list):
        return [_mask_urls(v) for v in value]
    if isinstance(value, dict):
        return {k: _mask_urls(v) for k, v in value.items()}
    return value


# GATEWAY_* variables that are not settings: the resolved settings handed to uvicorn's workers,
# the test suite's coverage switch.
_NOT_SETTINGS = frozenset({"GATEWAY_RESOLVED_SETTINGS", "GATEWAY_TEST_COVERAGE"})


def shared_redis(settings: Settings) -> list[str]:
    """Warnings for one Redis server given two jobs that must not share it: the cache (which
    should evict, ``volatile-lru``) and the jobs' queue and records (which must never evict).
    A different database number on the same server is the same memory (docs/cache.md)."""
    if settings.cache is None or not settings.jobs.enabled:
        return []
    cache, queue = urlsplit(settings.cache.storage), urlsplit(settings.jobs.queue)
    if (cache.hostname, cache.port or 6379) != (queue.hostname, queue.port or 6379):
        return []
    return [
        f"cache.storage and jobs.queue are the same Redis server ({cache.hostname}:{cache.port or 6379}): "
        "a full cache would make job submissions fail, and an evicting Redis would lose jobs. Give "
        "the cache a Redis of its own (docs/cache.md, 'Redis for the cache')."
    ]


def stray_env_vars(environ: Mapping[str, str], settings: Settings) -> list[str]:
    """``GATEWAY_*`` variables that set nothing, each with a "did you mean" when one is close.

    pydantic-settings ignores a variable whose first part names no top-level key
    (``GATEWAY_TIMEOUT__IDLE``, ``GATEWAY_BACKEND``), so a typo there would be silent; a typo
    deeper down (``GATEWAY_TIMEOUTS__IDEL``) is already a validation error. Variables the config
    names for a secret (``auth.jwt.secret_env``) are not strays.
    """
    named = {v.env.upper() for v in secret_vars(settings)}
    known = list(Settings.model_fields)
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in named or upper in _NOT_SETTINGS:
            continue
        head, _, rest = upper[len(ENV_PREFIX) :].partition(ENV_DELIMITER)
        if head.lower() in known:
            continue
        line = f"{name}: sets no setting (not a top-level key)"
        close = difflib.get_close_matches(head.lower(), known, n=1, cutoff=0.6)
        if close:
            fixed = ENV_PREFIX + close[0].upper() + (ENV_DELIMITER + rest if rest else "")
            line += f"; did you mean `{close[0]}` ({fixed})?"
        lines.append(line)
    return lines
