"""Issue #16, adversarially: what a newcomer types that the CLI took without a word.

Each test runs ``llm-gateway`` in a fresh process (tests/test_cli.py's ``run_cli``): no mocks.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.test_cli import run_cli

LEDGER_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- secrets in URL query strings


def test_ledger_dsn_password_in_query_string_is_refused(tmp_path: Path) -> None:
    """libpq and asyncpg read ``?password=`` as the password: the "no password in the DSN" rule
    must hold for it too (it was accepted, then logged in clear by "ledger connected" and printed
    by check-config)."""
    cfg = _write(
        tmp_path,
        f"backends: [{{url: 'http://127.0.0.1:9'}}]\nledger:\n  dsn: '{LEDGER_DSN}?password=LEAKME42'\n",
    )
    p = run_cli("check-config", str(cfg))
    assert "LEAKME42" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert p.returncode == 2, p.stdout
    assert "ledger.dsn" in p.stderr and "password_env" in p.stderr, p.stderr


def test_print_config_masks_password_query_parameters(tmp_path: Path) -> None:
    """redis-py takes ``?password=`` from a URL's query: print-config must mask it like ``:pw@``."""
    cfg = _write(
        tmp_path,
        "backends: [{url: 'http://127.0.0.1:9'}]\n"
        "rate_limits: {storage: 'redis://127.0.0.1:6379/0?password=QUERYPW2'}\n"
        "jobs: {enabled: true, queue: 'redis://127.0.0.1:6379/0?db=0&password=QUERYPW3',"
        " files: 'file:///tmp/x'}\n",
    )
    for args in (("serve", "--config", str(cfg), "--print-config"), ("check-config", str(cfg))):
        p = run_cli(*args)
        assert p.returncode == 0, p.stderr
        assert "QUERYPW" not in p.stdout, p.stdout
        body = p.stdout if args[0] == "serve" else p.stdout.split("\n", 1)[1]
        printed = yaml.safe_load(body)
        assert printed["rate_limits"]["storage"].startswith("redis://127.0.0.1:6379/0?password=")
        assert printed["jobs"]["queue"].startswith("redis://127.0.0.1:6379/0?db=0&password=")


# ---------------------------------------------------------------- token


def test_token_refuses_an_empty_subject() -> None:
    """``--sub ""`` signed a token the gateway answers 401 "The token has no `sub` claim"."""
    p = run_cli(
        "token",
        "--config",
        "examples/auth-limits.yaml",
        "--sub",
        "",
        env={"GATEWAY_JWT_SECRET": "a-test-secret"},
    )
    assert p.returncode == 2, p.stdout
    assert p.stdout == ""
    assert "--sub" in p.stderr, p.stderr


# ---------------------------------------------------------------- GATEWAY_* typos


def test_check_config_names_a_gateway_variable_that_sets_nothing() -> None:
    """``GATEWAY_TIMEOUTS__IDEL`` gets "did you mean `idle`", but a typo in the section
    (``GATEWAY_TIMEOUT__IDLE``, ``GATEWAY_BACKEND`` after the ``--backend`` flag) was silently
    ignored: check-config printed the defaults and OK."""
    p = run_cli(
        "check-config",
        "examples/vllm-two-models.yaml",
        env={"GATEWAY_TIMEOUT__IDLE": "3", "GATEWAY_BACKEND": "http://10.9.9.9:8000"},
    )
    assert "GATEWAY_TIMEOUT__IDLE" in p.stderr, p.stderr
    assert "`timeouts`" in p.stderr, p.stderr
    assert "GATEWAY_BACKEND " in p.stderr or "GATEWAY_BACKEND:" in p.stderr, p.stderr
    assert "`backends`" in p.stderr, p.stderr


def test_check_config_does_not_flag_secret_variables_it_names() -> None:
    """GATEWAY_JWT_SECRET is the example's `secret_env`: a variable the config reads, not a typo."""
    p = run_cli("check-config", "examples/auth-limits.yaml", env={"GATEWAY_JWT_SECRET": "a-test-secret"})
    assert p.returncode == 0, p.stderr
    assert "GATEWAY_JWT_SECRET" not in p.stderr, p.stderr
