"""``llm-gateway``: serve the gateway, run the vLLM simulator, check a config file."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from gateway.config import ConfigError, Settings, load_settings, settings_to_json


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import METRICS_DIR_ENV, SETTINGS_ENV, create_app
    from gateway.server import ListenerLimits, QuietServer, http_protocol

    overrides: dict[str, Any] = {}
    server: dict[str, Any] = {}
    for key in ("host", "port", "workers"):
        value = getattr(args, key)
        if value is not None:
            server[key] = value
    if args.allow_unauthenticated:
        server["allow_unauthenticated"] = True
    if server:
        overrides["server"] = server
    if args.backend:
        overrides["backends"] = args.backend
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
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


def _check_config(args: argparse.Namespace) -> int:
    from gateway.app import check_startup

    try:
        settings = load_settings(args.file)
        check_startup(settings)
    except ConfigError as exc:
        print(f"{args.file}: invalid configuration\n{exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK")
    print(_describe(settings))
    return 0


def _describe(settings: Settings) -> str:
    import yaml

    data = settings.model_dump(mode="json")  # secrets print as '**********'
    return yaml.safe_dump(data, sort_keys=False)


def _token(args: argparse.Namespace) -> int:
    from gateway.auth.jwt import issue_token

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    if settings.auth.jwt is None:
        print("the config has no auth.jwt section", file=sys.stderr)
        return 2
    try:
        print(issue_token(settings.auth.jwt, args.sub, args.team, args.tier, args.ttl))
    except (ValueError, StopIteration) as exc:
        print(f"cannot sign a token: {exc or 'no HS* algorithm configured'}", file=sys.stderr)
        return 2
    return 0


def _sim(args: argparse.Namespace) -> int:
    from gateway.sim.server import run_simulator

    return run_simulator(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config file")
    serve.add_argument(
        "--backend",
        action="append",
        help="vLLM base URL (repeatable); overrides the config file and GATEWAY_BACKENDS",
    )
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--workers", type=int, help="uvicorn worker processes (default 1)")
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve without auth on a non-loopback address (otherwise refused)",
    )
    serve.set_defaults(func=_serve)

    token = sub.add_parser("token", help="print a development JWT signed with the config's HS* secret")
    token.add_argument("--config", required=True)
    token.add_argument("--sub", required=True, help="subject")
    token.add_argument("--team")
    token.add_argument("--tier")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    token.set_defaults(func=_token)

    check = sub.add_parser("check-config", help="validate a config file and print what it means")
    check.add_argument("file")
    check.set_defaults(func=_check_config)

    from gateway.sim.options import add_sim_arguments

    sim = sub.add_parser("sim", help="run the vLLM simulator (no GPU needed)")
    add_sim_arguments(sim)
    sim.set_defaults(func=_sim)
    __import__("gateway.ledger.cli", fromlist=["register"]).register(sub)  # db, usage, export-dataset, purge
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
