"""``llm-gateway``: serve the gateway, run the vLLM simulator, check a config file.

Each subcommand is registered by one ``register_*(sub)`` call in :func:`build_parser`; a
subcommand living in another module adds itself the same way (``module.register(sub)``), and
gets this module's help formatter through the subparsers' parser class.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any, cast

from gateway import __version__
from gateway.config import ConfigError, Settings, load_settings, settings_to_json
from gateway.config_check import Loc, describe, explain, shared_redis, stray_env_vars, unset_secret_vars
from gateway.ledger.cli import register as register_ledger

if TYPE_CHECKING:
    # What ``ArgumentParser.add_subparsers`` returns; argparse names the class privately.
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

DESCRIPTION = (
    "An OpenAI-compatible gateway in front of vLLM: serve it, run the bundled vLLM simulator, "
    "check a config file, mint a development token."
)


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[Loc, str]]:
    """The settings the ``serve`` flags override, and which flag set which settings path."""
    overrides: dict[str, Any] = {}
    flags: dict[Loc, str] = {}
    server: dict[str, Any] = {}
    for key in ("host", "port", "workers"):
        value = getattr(args, key)
        if value is not None:
            server[key] = value
            flags[("server", key)] = f"--{key}"
    if args.allow_unauthenticated:
        server["allow_unauthenticated"] = True
        flags[("server", "allow_unauthenticated")] = "--allow-unauthenticated"
    if server:
        overrides["server"] = server
    if args.backend:
        overrides["backends"] = args.backend
        flags[("backends",)] = "--backend"
    return overrides, flags


def _load(args: argparse.Namespace, config: str | None) -> Settings | None:
    """The settings ``serve`` would run with, or None after printing why they are invalid."""
    overrides, flags = _overrides(args)
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        where = f" in {config}" if config else ""
        print(f"configuration error{where}:\n{explain(exc, os.environ, flags)}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    settings = _load(args, args.config)
    if settings is None:
        return 2
    if args.print_config:
        print(describe(settings), end="")
        return 0
    return _run(settings)


def _run(settings: Settings) -> int:
    import uvicorn

    from gateway.app import METRICS_DIR_ENV, SETTINGS_ENV, create_app
    from gateway.server import ListenerLimits, QuietServer, http_protocol

    s = settings.server
    common: dict[str, Any] = {
        "host": s.host,
        "port": s.port,
        "loop": "uvloop",
        # httptools, with limits on what a connection may hold before the app sees a request.
        "http": http_protocol(
            ListenerLimits(s.max_header_bytes, s.header_timeout, s.body_timeout, s.max_connections)
        ),
        "log_config": None,
        "access_log": False,
        "server_header": False,
        # Nothing reads the client address or scheme: skip uvicorn's X-Forwarded-* middleware, a
        # layer of every request.
        "proxy_headers": False,
        # The gateway drains, and ends the proxied requests still running, before uvicorn is told
        # to stop (gateway/drain.py); this only bounds what is left after that (a health or
        # metrics request, a connection closing), so a stop ends soon after server.drain_seconds.
        "timeout_graceful_shutdown": 1,
        "timeout_keep_alive": 75,
    }
    if s.workers > 1:
        import shutil
        import tempfile

        from gateway.app import check_startup

        try:
            check_startup(settings)  # workers build the app out of sight: find a bad config here
        except ConfigError as exc:
            print(f"configuration error:\n{exc}", file=sys.stderr)
            return 2
        os.environ[SETTINGS_ENV] = settings_to_json(settings)
        # Workers are spawned fresh, so they import prometheus-client with this set.
        metrics_dir = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
        os.environ[METRICS_DIR_ENV] = metrics_dir
        try:
            uvicorn.run("gateway.app:create_app_from_env", factory=True, workers=s.workers, **common)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    else:
        try:
            app = create_app(settings)
        except ConfigError as exc:
            print(f"configuration error:\n{exc}", file=sys.stderr)
            return 2
        quiet = QuietServer(uvicorn.Config(app, **common))
        try:
            quiet.run()
        except KeyboardInterrupt:
            pass
        if not quiet.started:
            return 3  # uvicorn's start-up failure code (e.g. the port is taken)
    return 0


# What `check-config` puts in a secret variable it finds unset, to check everything else.
_PLACEHOLDER = "check-config-placeholder-not-a-secret"


def _check_config(args: argparse.Namespace) -> int:
    from gateway.app import check_startup

    if args.file is not None and args.config is not None and args.file != args.config:
        print(f"two config files given: {args.file} and --config {args.config}", file=sys.stderr)
        return 2
    config = args.config or args.file
    label = config or "defaults and GATEWAY_* environment"
    settings = _load(args, config)
    if settings is None:
        return 2
    unset = unset_secret_vars(settings, os.environ)
    if unset and args.require_secrets:
        lines = [f"{v.env} (named by {v.key}) is not set" for v in unset]
        print(f"configuration error ({label}): secrets missing\n" + "\n".join(lines), file=sys.stderr)
        return 2
    # serve reads these variables while it builds the gateway; a placeholder lets everything else
    # be checked without the secret. This process ends right after.
    for v in unset:
        os.environ[v.env] = _PLACEHOLDER
    try:
        # What the parts log while they are built goes with the warnings: stdout stays the
        # verdict and the settings (YAML), for a CI job or a diff to read.
        with contextlib.redirect_stdout(sys.stderr):
            check_startup(settings)
    except ConfigError as exc:
        print(f"configuration error ({label}):\n{exc}", file=sys.stderr)
        return 2
    for v in unset:
        print(
            f"warning: {v.env} (named by {v.key}) is not set here; checked with a placeholder. "
            "Set it where serve runs (check-config --require-secrets makes this an error)",
            file=sys.stderr,
        )
    for line in [*stray_env_vars(os.environ, settings), *shared_redis(settings)]:
        print(f"warning: {line}", file=sys.stderr)
    missing = ", ".join(v.env for v in unset)
    print(f"{label}: OK" + (f" (not set here: {missing})" if unset else ""))
    print(describe(settings), end="")
    return 0


def _token(args: argparse.Namespace) -> int:
    from gateway.auth.jwt import issue_token

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"configuration error in {args.config}:\n{explain(exc, os.environ, {})}", file=sys.stderr)
        return 2
    if settings.auth.jwt is None:
        print("the config has no auth.jwt section", file=sys.stderr)
        return 2
    refusal = _token_refusal(settings, args.tier, args.ttl, args.sub, args.team)
    if refusal is not None:
        print(f"refusing to sign a token the gateway would not accept: {refusal}", file=sys.stderr)
        return 2
    try:
        print(issue_token(settings.auth.jwt, args.sub, args.team, args.tier, args.ttl))
    except (ValueError, StopIteration) as exc:
        print(f"cannot sign a token: {exc or 'no HS* algorithm configured'}", file=sys.stderr)
        return 2
    return 0


_MAX_TOKEN_TTL = 366 * 86400


def _token_refusal(
    settings: Settings, tier: str | None, ttl: int, sub: str, team: str | None = None
) -> str | None:
    """Why the gateway configured by ``settings`` would refuse such a token, or None.

    Mirrors the gateway's own checks: a tier outside a non-empty ``tiers`` is answered 403
    ``unknown_tier`` (gateway/pipeline/authenticate.py), and a token whose ``exp`` is not in the
    future is expired on arrival; an empty ``sub`` is 401 (the token has no subject).
    """
    if not sub:
        return "--sub is empty: the gateway refuses a token without a subject (401)"
    if ttl <= 0:
        return f"--ttl {ttl}: a token must expire in the future (give seconds > 0)"
    if ttl > _MAX_TOKEN_TTL:
        return f"--ttl {ttl}: longer than a year ({_MAX_TOKEN_TTL} s); a development token should expire"
    if team == "":
        return "--team is empty: the gateway reads an empty team as no team; leave --team out"
    if tier is not None and settings.tiers and tier not in settings.tiers:
        known = ", ".join(sorted(settings.tiers))
        return f"--tier {tier}: no such tier in the config's `tiers` ({known}); requests would get 403"
    return None


def _sim(args: argparse.Namespace) -> int:
    from gateway.sim.server import run_simulator

    return run_simulator(args)


def _version(_: argparse.Namespace) -> int:
    print(f"llm-gateway {__version__}")
    return 0


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none worth showing or says it.

    Like argparse.ArgumentDefaultsHelpFormatter, but silent for ``None``, ``False`` (flags) and
    empty lists, which would print as "(default: None)".
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is argparse.SUPPRESS
            or default is None
            or default is False
            or default == []
            or default == ""
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose help shows defaults; subparsers made by ``add_parser`` inherit it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that decide the settings: ``serve``'s, shared by ``check-config``."""
    p.add_argument(
        "--config", metavar="FILE", help="YAML config file (none: defaults and GATEWAY_* variables)"
    )
    p.add_argument(
        "--backend",
        action="append",
        metavar="URL",
        help="vLLM base URL (repeatable); overrides the config file and GATEWAY_BACKENDS",
    )
    p.add_argument("--host", help="listen address; overrides server.host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port; overrides server.port (default 8080)")
    p.add_argument(
        "--workers", type=int, help="uvicorn worker processes; overrides server.workers (default 1)"
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve without auth on a non-loopback address (otherwise refused)",
    )


def register_serve(sub: Subcommands) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Settings: flags over GATEWAY_* variables over the config file.",
    )
    add_config_arguments(serve)
    serve.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings (secrets masked) and exit instead of serving",
    )
    serve.set_defaults(func=_serve)


def register_token(sub: Subcommands) -> None:
    token = sub.add_parser(
        "token",
        help="print a development JWT signed with the config's HS* secret",
        description=(
            "Print a development JWT signed with the config's HS* secret (auth.jwt.secret_env). "
            "Refuses, exit 2, a token the gateway would refuse: an unknown tier, a ttl <= 0 or over "
            "a year, an empty subject or team."
        ),
    )
    token.add_argument("--config", required=True, help="YAML config file with an auth.jwt section")
    token.add_argument("--sub", required=True, help="subject (the principal's name)")
    token.add_argument("--team", help="team claim (none by default)")
    token.add_argument("--tier", help="tier claim; one of the config's tiers when it defines any")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (> 0)")
    token.set_defaults(func=_token)


def register_check_config(sub: Subcommands) -> None:
    check = sub.add_parser(
        "check-config",
        help="validate a config file and print what serve would run with",
        description=(
            "Validate the settings serve would run with (same flags), build every part of the "
            "gateway without listening, and print the effective settings with secrets masked. "
            "Exit 0 when serve would start, 2 naming the bad key, flag or GATEWAY_* variable "
            "otherwise. A secret the config names by environment variable (auth.jwt.secret_env, "
            "external.api_key_env) that is unset here is a warning, so CI can check configs "
            "without secrets; --require-secrets makes it an error (run it where serve runs)."
        ),
    )
    check.add_argument("file", nargs="?", help="YAML config file (same as --config)")
    add_config_arguments(check)
    check.add_argument(
        "--require-secrets",
        action="store_true",
        help="an unset secret variable is an error, not a warning",
    )
    check.set_defaults(func=_check_config)


def register_sim(sub: Subcommands) -> None:
    from gateway.sim.options import add_sim_arguments

    sim = sub.add_parser(
        "sim",
        help="run the vLLM simulator (no GPU needed)",
        description=(
            "A vLLM OpenAI server stand-in for development and tests: /v1/models, chat, completions, "
            "embeddings, /health, /metrics, with timing and faults set below (or at run time with "
            "POST /sim/control). Prints a JSON line when it listens."
        ),
    )
    add_sim_arguments(sim)
    sim.set_defaults(func=_sim)


def register_version(sub: Subcommands) -> None:
    version = sub.add_parser("version", help="print the version and exit")
    version.set_defaults(func=_version)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llm-gateway", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Typed as plain ArgumentParser subcommands, so a register(sub) elsewhere needs no Parser.
    sub = cast("Subcommands", parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    register_serve(sub)
    register_sim(sub)
    register_check_config(sub)
    register_token(sub)
    register_version(sub)
    register_ledger(sub)  # db, usage, export-dataset, purge (gateway/ledger/cli.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
