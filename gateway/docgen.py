"""Render docs/configuration.md from the Settings schema (``make docs``); a test keeps it current."""

from __future__ import annotations

from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gateway.config import Settings

HEADER = """# Configuration

Generated from `gateway/config.py` by `make docs`; a test fails when this file is out of date.

Sources, highest priority first: CLI flags (`--backend`, `--host`, `--port`, `--workers`),
environment variables, the YAML file given with `--config`, defaults. An environment variable is
`GATEWAY_` + the key path joined with `__`, upper-case: `timeouts.idle` is `GATEWAY_TIMEOUTS__IDLE`.
`GATEWAY_BACKENDS` takes comma-separated URLs (`http://a:8000,http://b:8000`) or a JSON list of
backend objects. Unknown keys are errors: `llm-gateway check-config FILE` names them.
A complete authentication and rate-limit configuration: `examples/auth-limits.yaml`.

Example:

```yaml
server:
  host: 0.0.0.0
  port: 8080
backends:
  - url: http://127.0.0.1:8000
    models: [qwen2.5-7b]
    api_key: change-me        # vLLM's --api-key, sent upstream
timeouts:
  first_byte: 60
  idle: 30
```
"""


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return ""
        if isinstance(value, list):
            value = [v.url if hasattr(v, "url") else v for v in value]
    else:
        value = field.default
    if value is None:
        return "—"
    return f"`{value}`"


def _type(field: FieldInfo) -> str:
    text = str(field.annotation).replace("typing.", "")
    for prefix in ("gateway.config_auth.", "gateway.config.", "pydantic.types.", "pathlib."):
        text = text.replace(prefix, "")
    text = text.replace("<class '", "").replace("'>", "")
    return text.replace(" | ", " or ")


def _nested(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """(how the key nests, the model) for sections, lists and maps of sections."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "", annotation
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is list and args and _nested(args[0]):
        return "[]", args[0]
    if origin is dict and len(args) == 2 and _nested(args[1]):
        return ".<name>", args[1]
    for arg in args:  # Optional[Section]
        found = _nested(arg)
        if found is not None and arg is not type(None):
            return found
    return None


def _section(path: str, model: type[BaseModel], out: list[str], titled: bool = False) -> None:
    """Append ``model``'s table under ``## `path``` (no heading again when ``titled``: the
    caller wrote it, with the section's description)."""
    rows: list[str] = []
    subsections: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        nested = _nested(field.annotation)
        key = f"{path}.{name}" if path else name
        if nested is not None:
            subsections.append((key + nested[0], nested[1]))
            if field.description:
                rows.append(f"| `{key}` | section | {_default(field)} | {field.description} |")
            continue
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type(field)} | {_default(field)} | {desc} |")
    if rows:
        if not titled:
            out.append(f"\n## `{path}`\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        out.extend(rows)
    for key, sub in subsections:
        _section(key, sub, out)


def render() -> str:
    out = [HEADER]
    for name, field in Settings.model_fields.items():
        nested = _nested(field.annotation)
        if nested is None:
            continue
        titled = bool(field.description) and not nested[0]
        if field.description:
            out.append(f"\n## `{name}`\n\n{field.description} Default: {_default(field) or 'empty'}.\n")
        _section(name + nested[0], nested[1], out, titled)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
