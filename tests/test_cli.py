"""The command line a newcomer meets first: version, help, `token`'s refusals, `check-config`."""

from __future__ import annotations

import argparse
import os
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import __version__
from gateway.cli import build_parser
from tests.procs import ROOT, Gateway, Sim, python_m


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``llm-gateway ARGS`` in a fresh process; the caller's GATEWAY_* variables are not passed on."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [*python_m("gateway"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **(env or {})},
        timeout=60,
    )


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim()
    yield s
    s.stop()


# ---------------------------------------------------------------- version


def test_version_is_the_package_version() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["project"]["version"] == __version__


@pytest.mark.parametrize("args", [("--version",), ("version",)])
def test_version_flag_and_command(args: tuple[str, ...]) -> None:
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"llm-gateway {__version__}"


def test_health_reports_the_version(sim: Sim) -> None:
    gw = Gateway([sim.url])
    try:
        body = httpx.get(gw.url + "/health", timeout=5).json()
    finally:
        gw.stop()
    assert body["version"] == __version__


# ---------------------------------------------------------------- token


def token(*extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "token",
        "--config",
        "examples/auth-limits.yaml",
        "--sub",
        "alice",
        *extra,
        env={"GATEWAY_JWT_SECRET": "a-test-secret"},
    )


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (("--tier", "gold"), "--tier gold: no such tier in the config's `tiers` (batch, interactive)"),
        (("--ttl", "-60"), "--ttl -60: a token must expire in the future"),
        (("--ttl", "0"), "--ttl 0: a token must expire in the future"),
        (("--ttl", "99999999999999999999"), "longer than a year"),
        (("--team", ""), "--team is empty"),
    ],
)
def test_token_refuses_what_the_gateway_would_refuse(extra: tuple[str, ...], why: str) -> None:
    p = token(*extra)
    assert p.returncode == 2, p.stdout
    assert p.stdout == ""
    assert why in p.stderr


def test_token_signs_a_configured_tier() -> None:
    p = token("--tier", "batch", "--ttl", "60")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().count(".") == 2


# ---------------------------------------------------------------- check-config and serve --print-config


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    return str(path)


def test_check_config_without_secrets_warns_and_passes() -> None:
    p = run_cli("check-config", "examples/auth-limits.yaml")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("examples/auth-limits.yaml: OK (not set here: GATEWAY_JWT_SECRET)\n")
    assert "warning: GATEWAY_JWT_SECRET (named by auth.jwt.secret_env) is not set here" in p.stderr


def test_check_config_require_secrets_fails_without_them() -> None:
    p = run_cli("check-config", "--require-secrets", "examples/auth-limits.yaml")
    assert p.returncode == 2, p.stdout
    assert "GATEWAY_JWT_SECRET (named by auth.jwt.secret_env) is not set" in p.stderr
    ok = run_cli(
        "check-config", "--require-secrets", "examples/auth-limits.yaml", env={"GATEWAY_JWT_SECRET": "s"}
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""


def test_check_config_without_secrets_still_checks_the_rest(tmp_path: Path) -> None:
    # The keys file is read after the secret while the gateway is built: found with the placeholder.
    missing = tmp_path / "no-such-keys.yaml"
    cfg = write(tmp_path, f"auth:\n  jwt:\n    secret_env: SOME_UNSET_SECRET\n  api_keys_file: {missing}\n")
    p = run_cli("check-config", cfg)
    assert p.returncode == 2, p.stdout
    assert str(missing) in p.stderr
    assert "SOME_UNSET_SECRET" not in p.stderr


@pytest.mark.parametrize(
    ("key", "url", "why"),
    [
        ("cache.storage", "http://127.0.0.1:6379", "must be a redis:// or rediss:// URL"),
        ("cache.storage", "redis://127.0.0.1:notaport/0", "the port must be a number"),
        ("cache.storage", "redis://127.0.0.1:6379/abc", "the path must be a database number"),
        ("jobs.queue", "redis:/x", "the URL names no host"),
        ("rate_limits.storage", "redis://h:99999/0", "the port must be a number"),
        ("rate_limits.storage", "redis://127.0.0.1:6379?db=abc", "Invalid value for 'db'"),
        ("jobs.queue", "redis://127.0.0.1:6379/0?socket_timeout=x", "Invalid value for 'socket_timeout'"),
    ],
)
def test_a_malformed_redis_url_is_named_by_its_key(tmp_path: Path, key: str, url: str, why: str) -> None:
    """It crashed check-config and serve with a traceback (exit 1), or was taken as database 0."""
    section, field = key.split(".")
    cfg = write(tmp_path, f"{section}:\n  {field}: '{url}'\n")
    p = run_cli("check-config", cfg)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert f"{key}: {why}" in p.stderr
    assert "Traceback" not in p.stderr


def test_check_config_warns_when_the_cache_and_the_jobs_share_a_redis(tmp_path: Path) -> None:
    """docs/cache.md says never to (a full cache makes job submissions fail); check-config said
    nothing. Another database number on the same server is the same memory."""
    shared = write(tmp_path, "cache: {storage: 'redis://127.0.0.1:6379/1'}\njobs: {enabled: true}\n")
    p = run_cli("check-config", shared)
    assert p.returncode == 0, p.stderr
    assert "warning: cache.storage and jobs.queue are the same Redis server (127.0.0.1:6379)" in p.stderr
    apart = tmp_path / "apart"
    apart.mkdir()
    own = write(apart, "cache: {storage: 'redis://127.0.0.1:6380/0'}\njobs: {enabled: true}\n")
    p = run_cli("check-config", own)
    assert p.returncode == 0, p.stderr
    assert "same Redis" not in p.stderr


def test_an_error_from_the_environment_is_named_by_its_variable(tmp_path: Path) -> None:
    cfg = write(tmp_path, "timeouts:\n  idle: 5\n  connect: -1\n")
    p = run_cli("check-config", cfg, env={"GATEWAY_TIMEOUTS__IDLE": "abc"})
    assert p.returncode == 2, p.stdout
    lines = p.stderr.splitlines()
    assert any(
        line.startswith("environment variable GATEWAY_TIMEOUTS__IDLE (sets timeouts.idle): Input should be")
        for line in lines
    ), p.stderr
    assert any(line.startswith("timeouts.connect: Input should be greater than 0") for line in lines)
    assert not any(line.startswith("timeouts.idle") for line in lines)


def test_an_error_from_a_flag_is_named_by_the_flag(tmp_path: Path) -> None:
    p = run_cli("check-config", write(tmp_path, "server:\n  port: 9000\n"), "--port", "0")
    assert p.returncode == 2, p.stdout
    assert "--port (sets server.port): Input should be greater than or equal to 1" in p.stderr


@pytest.mark.parametrize(
    ("yaml_text", "line"),
    [
        ("server:\n  prot: 80\n", "server.prot: unknown key; did you mean `port`?"),
        (
            "backends:\n  - url: http://a:1\n    max_inflight: 3\n",
            "backends.0.max_inflight: unknown key; did you mean `max_in_flight`?",
        ),
        (
            "external:\n  base_url: http://x:1/v1\n  api_key_evn: K\n",
            "external.api_key_evn: unknown key; did you mean `api_key_env`?",
        ),
        (
            "teams:\n  a:\n    limits:\n      requests_per_minut: 1\n",
            "teams.a.limits.requests_per_minut: unknown key; did you mean `requests_per_minute`?",
        ),
        (
            "tiers:\n  gold:\n    rpm: 1\n",
            "tiers.gold.rpm: unknown key; known keys: requests_per_minute, tokens_per_minute, "
            "max_concurrent, priority",
        ),
        ("timeout:\n  idle: 1\n", "timeout: unknown key; did you mean `timeouts`?"),
    ],
)
def test_an_unknown_key_gets_the_closest_known_one(tmp_path: Path, yaml_text: str, line: str) -> None:
    p = run_cli("check-config", write(tmp_path, yaml_text))
    assert p.returncode == 2, p.stdout
    assert line in p.stderr.splitlines()


def test_an_unknown_key_from_the_environment(tmp_path: Path) -> None:
    p = run_cli("check-config", env={"GATEWAY_HEALTH__INTREVAL": "3"})
    assert p.returncode == 2, p.stdout
    expected = "environment variable GATEWAY_HEALTH__INTREVAL (sets health.intreval): unknown key"
    assert f"{expected}; did you mean `interval`?" in p.stderr


def test_check_config_takes_the_serve_flags(tmp_path: Path) -> None:
    cfg = write(tmp_path, "server:\n  port: 9000\n")
    p = run_cli(
        "check-config",
        "--config",
        cfg,
        "--port",
        "9123",
        "--workers",
        "3",
        "--backend",
        "http://10.1.1.1:8000",
    )
    assert p.returncode == 0, p.stderr
    assert "  port: 9123\n" in p.stdout and "  workers: 3\n" in p.stdout
    assert "- url: http://10.1.1.1:8000\n" in p.stdout
    public = run_cli("check-config", cfg, "--host", "0.0.0.0")
    assert public.returncode == 2 and "--allow-unauthenticated" in public.stderr
    opened = run_cli("check-config", cfg, "--host", "0.0.0.0", "--allow-unauthenticated")
    assert opened.returncode == 0, opened.stderr


def test_check_config_refuses_two_different_files(tmp_path: Path) -> None:
    p = run_cli("check-config", write(tmp_path, "{}\n"), "--config", "examples/auth-limits.yaml")
    assert p.returncode == 2
    assert "two config files given" in p.stderr


def test_serve_print_config_masks_secrets_and_exits(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        "auth:\n  jwt:\n    secret: jwt-s3cret-value\n"
        "backends:\n  - url: http://10.0.0.1:8000\n    api_key: backend-s3cret\n"
        "rate_limits:\n  storage: redis://:redis-s3cret@10.0.0.2:6379/0\n",
    )
    p = run_cli("serve", "--config", cfg, "--port", "9124", "--print-config")
    assert p.returncode == 0, p.stderr
    assert "  port: 9124\n" in p.stdout
    assert "storage: redis://:**********@10.0.0.2:6379/0\n" in p.stdout
    assert "api_key: '**********'\n" in p.stdout
    for secret in ("jwt-s3cret-value", "backend-s3cret", "redis-s3cret"):
        assert secret not in p.stdout + p.stderr


# ---------------------------------------------------------------- help text


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_top_level_help_has_no_markup() -> None:
    p = run_cli("--help")
    assert p.returncode == 0
    assert "`" not in p.stdout
    for name in subcommands():
        assert name in p.stdout


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_has_a_help_line_and_shows_its_default(command: str) -> None:
    parser = subcommands()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings[0]}: no help"
        shown = formatter._get_help_string(action)
        assert shown is not None
        if action.default not in (None, False, [], "", argparse.SUPPRESS):
            assert str(action.default) in shown % {"default": action.default}, (command, action.dest)


def test_sim_help_shows_the_defaults() -> None:
    p = run_cli("sim", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for option, default in [
        ("--host HOST listen address", "127.0.0.1"),
        ("--port PORT listen port", "8000"),
        ("--max-model-len MAX_MODEL_LEN context length in tokens", "512"),
        ("--seed SEED seed of the --error-rate draws", "0"),
        ("--ttft TTFT seconds to first token", "0.05"),
    ]:
        assert option in text
        assert f"(default: {default})" in text.split(option, 1)[1].split(" --", 1)[0], option
