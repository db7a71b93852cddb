"""Every documented option starts the server, and `check-config` fails whenever `serve` would.

The file-valued options are found by walking the Settings schema, so a new one is not silently
left out: the test below must learn how to fill it in.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from gateway.config import Settings
from tests.idp import SigningKey
from tests.procs import ROOT, Gateway, Sim


def path_fields(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Dotted names of every Path-typed option in the settings tree."""
    for name, field in model.model_fields.items():
        yield from _walk(field.annotation, f"{prefix}{name}")


def _walk(tp: Any, where: str) -> Iterator[str]:
    if tp is Path:
        yield where
        return
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield from path_fields(tp, where + ".")
        return
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, list, dict, typing.Annotated):
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            args = args[:1]
        elif origin is dict:
            args = args[1:]
            where += ".*"
        elif origin is list:
            where += "[]"
        for arg in args:
            yield from _walk(arg, where)


def public_key_file(tmp: Path) -> str:
    pem = tmp / "jwt.pem"
    pem.write_text(SigningKey("RS256", "k1").pem)
    return f"auth:\n  jwt:\n    algorithms: [RS256]\n    public_key_file: {pem}\n"


def api_keys_file(tmp: Path) -> str:
    keys = tmp / "keys.yaml"
    keys.write_text(f"- {{sha256: {hashlib.sha256(b'sk-from-file').hexdigest()}, subject: svc}}\n")
    return f"auth:\n  api_keys_file: {keys}\n"


def ledger_password_file(tmp: Path) -> str:
    secret = tmp / "pg-password"
    secret.write_text("unused-with-trust-auth\n")
    return f"ledger:\n  dsn: postgresql://127.0.0.1:5432/test\n  password_file: {secret}\n"


def ledger_spool_dir(tmp: Path) -> str:
    return f"ledger:\n  dsn: postgresql://127.0.0.1:5432/test\n  spool_dir: {tmp / 'spool'}\n"


FILLERS: dict[str, Callable[[Path], str]] = {
    "auth.jwt.public_key_file": public_key_file,
    "auth.api_keys_file": api_keys_file,
    "ledger.password_file": ledger_password_file,
    "ledger.spool_dir": ledger_spool_dir,
}


def test_every_file_valued_option_is_covered() -> None:
    assert set(path_fields(Settings)) == set(FILLERS)


def check_config(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # --require-secrets: an unset secret variable fails as serve does (a warning without it)
        [sys.executable, "-m", "gateway", "check-config", "--require-secrets", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim()
    yield s
    s.stop()


@pytest.mark.parametrize("option", sorted(FILLERS))
@pytest.mark.parametrize("workers", [1, 2])
def test_file_valued_option_starts_serve(sim: Sim, tmp_path: Path, option: str, workers: int) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(FILLERS[option](tmp_path))
    checked = check_config(cfg)
    assert checked.returncode == 0, checked.stderr
    gw = Gateway([sim.url], "--workers", str(workers), config=cfg, wait_ready=False)
    try:
        assert gw.proc.alive()
    finally:
        gw.stop()
    assert gw.proc.proc.returncode == 0, gw.proc.output()[-2000:]


def test_jwks_url_of_an_idp_that_is_down_still_starts(sim: Sim, tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("auth:\n  jwt:\n    algorithms: [RS256]\n    jwks_url: http://127.0.0.1:9/jwks.json\n")
    assert check_config(cfg).returncode == 0
    gw = Gateway([sim.url], config=cfg, wait_ready=False)
    gw.stop()
    assert gw.proc.proc.returncode == 0


BROKEN = {
    "public-key-file-not-a-key": lambda tmp: (
        (tmp / "jwt.pem").write_text("this is not a PEM key\n"),
        f"auth:\n  jwt:\n    algorithms: [RS256]\n    public_key_file: {tmp / 'jwt.pem'}\n",
    )[1],
    "public-key-file-missing": lambda tmp: (
        f"auth:\n  jwt:\n    algorithms: [RS256]\n    public_key_file: {tmp / 'absent.pem'}\n"
    ),
    "api-keys-file-not-a-list": lambda tmp: (
        (tmp / "keys.yaml").write_text("sha256: abc\n"),
        f"auth:\n  api_keys_file: {tmp / 'keys.yaml'}\n",
    )[1],
    "api-keys-file-bad-entry": lambda tmp: (
        (tmp / "keys.yaml").write_text("- {subject: nobody}\n"),
        f"auth:\n  api_keys_file: {tmp / 'keys.yaml'}\n",
    )[1],
    "hs-secret-env-unset": lambda tmp: (
        "auth:\n  jwt:\n    secret_env: LLM_GATEWAY_TEST_SURELY_UNSET_VARIABLE\n"
    ),
}


@pytest.mark.parametrize("make", BROKEN.values(), ids=BROKEN.keys())
def test_check_config_fails_exactly_when_serve_does(tmp_path: Path, make: Callable[[Path], str]) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(make(tmp_path))
    checked = check_config(cfg)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr
    served = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", "9", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert served.returncode == 2, served.stderr[-2000:]
    assert "configuration error" in served.stderr
