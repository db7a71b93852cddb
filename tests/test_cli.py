"""The command line a newcomer meets first: version, help, `token`'s refusals, `check-config`."""

from __future__ import annotations

import os
import subprocess
import tomllib
from collections.abc import Iterator

import httpx
import pytest

from gateway import __version__
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
