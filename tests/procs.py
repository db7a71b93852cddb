"""Real processes on free 127.0.0.1 ports: the simulator and the gateway, started and always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent

# With GATEWAY_TEST_COVERAGE=1 (`make coverage`) every gateway and simulator process runs under
# coverage.py, configured by pyproject.toml ([tool.coverage.run]: parallel data files, saved on
# SIGTERM), so the code that runs in the children is measured too.
COVERAGE = os.environ.get("GATEWAY_TEST_COVERAGE") == "1"


def python_m(module: str) -> list[str]:
    """The command line that runs ``python -m module``, under coverage when it is being measured."""
    if COVERAGE:
        return [sys.executable, "-m", "coverage", "run", "--parallel-mode", "-m", module]
    return [sys.executable, "-m", module]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Proc:
    """A child process with its output in a file; stopped by PID."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, name: str = "proc") -> None:
        self.args = list(args)
        fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(path)
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def until(
    check: Callable[[], Any],
    what: str = "condition",
    context: Callable[[], Any] = lambda: "",
    timeout: float = 15.0,
    interval: float = 0.02,
) -> Any:
    """Poll ``check`` until it returns something truthy, and return that; AssertionError naming
    ``what`` (and ``context()``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout}s {context()}".rstrip())
        time.sleep(interval)


def wait_http(url: str, proc: Proc, status: int | None = 200, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.args} exited ({proc.proc.returncode}):\n{proc.output()[-3000:]}")
        try:
            r = httpx.get(url, timeout=2)
            last = r.status_code
            if status is None or r.status_code == status:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not {status} after {timeout}s (last: {last}):\n{proc.output()[-3000:]}")


class Sim:
    def __init__(self, port: int | None = None, *flags: str, wait: bool = True) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.flags = flags
        self.proc = Proc([*python_m("gateway"), "sim", "--port", str(self.port), *flags], name="sim")
        if wait:
            try:
                wait_http(self.url + "/version", self.proc)
            except BaseException:
                self.proc.kill()  # never leave a half-started process behind
                raise

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/sim/stats", timeout=5).json()
        return data

    def control(self, **changes: Any) -> None:
        httpx.post(self.url + "/sim/control", json=changes, timeout=5).raise_for_status()

    def stop(self) -> None:
        self.proc.stop()


class Gateway:
    def __init__(
        self,
        backends: Sequence[str],
        *extra: str,
        env: dict[str, str] | None = None,
        config: Path | None = None,
        wait_ready: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [*python_m("gateway"), "serve", "--port", str(self.port)]
        if config is not None:
            args += ["--config", str(config)]
        for b in backends:
            args += ["--backend", b]
        base_env = {"GATEWAY_HEALTH__INTERVAL": "0.2"}
        self.proc = Proc([*args, *extra], env={**base_env, **(env or {})}, name="gateway")
        try:
            wait_http(self.url + ("/ready" if wait_ready else "/live"), self.proc)
        except BaseException:
            self.proc.kill()  # never leave a half-started process behind
            raise

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log_lines(self) -> list[str]:
        """Every complete non-empty line the process wrote so far (audit lines arrive in 50 ms
        batches; a line still being written, without its newline, is left for the next look)."""
        out = self.proc.output()
        complete = out[: out.rfind("\n") + 1] if self.proc.alive() else out
        return [line for line in complete.splitlines() if line.strip()]

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log records written so far (non-JSON lines skipped)."""
        out: list[dict[str, Any]] = []
        for line in self.log_lines():
            if not line.startswith("{"):
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def wait_logs(
        self, predicate: Callable[[dict[str, Any]], bool], count: int = 1, timeout: float = 5
    ) -> list[dict[str, Any]]:
        """All log records matching ``predicate``, once there are at least ``count`` of them.

        The gateway's log writer hands lines over in 50 ms batches (gateway/logs.py), so a line
        is not in the output the moment the response is; this polls until it is.

        Raises:
            AssertionError: fewer than ``count`` matching records after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = [rec for rec in self.log_records() if predicate(rec)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                tail = "\n".join(self.log_lines()[-20:])
                raise AssertionError(f"{len(found)} of {count} log records after {timeout}s:\n{tail}")
            time.sleep(0.02)

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5) -> dict[str, Any]:
        """The first log record matching ``predicate``, polled for up to ``timeout`` seconds."""
        return self.wait_logs(predicate, 1, timeout)[0]

    def wait_audit(self, request_id: str, timeout: float = 5) -> dict[str, Any]:
        """The audit line (``"event": "request"``) of one request, polled for."""
        return self.wait_log(
            lambda r: r.get("event") == "request" and r.get("request_id") == request_id, timeout
        )

    def stop(self) -> None:
        self.proc.stop()
