"""Configuration: YAML + env + flags, check-config's errors, and docs kept in sync with the schema."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings
from gateway.docgen import render
from tests.procs import ROOT, python_m


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [*python_m("gateway"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=30,
    )


def test_docs_configuration_md_is_generated_from_the_schema() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == render(), "run `make docs`"


def test_check_config_ok_prints_what_it_understood(tmp_path: Path) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text("server:\n  port: 9999\nbackends:\n  - url: http://10.0.0.1:8000/v1\n    api_key: s3cret\n")
    r = run_cli("check-config", str(f))
    assert r.returncode == 0, r.stderr
    assert "port: 9999" in r.stdout
    assert "http://10.0.0.1:8000" in r.stdout and "/v1" not in r.stdout
    assert "s3cret" not in r.stdout


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("server:\n  port: 0\n", "server.port"),
        ("server:\n  prot: 80\n", "server.prot"),
        ("timeouts:\n  idle: -1\n", "timeouts.idle"),
        ("backends:\n  - url: ftp://x\n", "backends.0.url"),
        ("backends: []\n", "backends"),
        ("logging:\n  level: loud\n", "logging.level"),
        ("nonsense: 1\n", "nonsense"),
    ],
)
def test_check_config_names_the_offending_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text(yaml_text)
    r = run_cli("check-config", str(f))
    assert r.returncode == 2
    assert key in r.stderr


def test_check_config_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text("server: [unclosed\n")
    r = run_cli("check-config", str(f))
    assert r.returncode == 2
    assert "not valid YAML" in r.stderr
    r = run_cli("check-config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2
    assert "not found" in r.stderr


def test_env_overrides_file_and_flags_override_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text("server:\n  port: 9000\n  host: 127.0.0.2\ntimeouts:\n  idle: 5\n")
    monkeypatch.setenv("GATEWAY_TIMEOUTS__IDLE", "7")
    monkeypatch.setenv("GATEWAY_SERVER__PORT", "9001")
    monkeypatch.setenv("GATEWAY_BACKENDS", "http://a:1, http://b:2/")
    s = load_settings(f, server={"port": 9002})
    assert s.timeouts.idle == 7
    assert s.server.port == 9002
    assert s.server.host == "127.0.0.2"  # the file's value survives a partial override
    assert [b.url for b in s.backends] == ["http://a:1", "http://b:2"]


def test_bad_env_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TIMEOUTS__CONNECT", "soon")
    with pytest.raises(ConfigError, match=r"timeouts\.connect"):
        load_settings()


def test_serve_with_bad_config_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text("server:\n  workers: 0\n")
    r = run_cli("serve", "--config", str(f))
    assert r.returncode == 2
    assert "server.workers" in r.stderr
