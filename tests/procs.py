"""Real processes on free 127.0.0.1 ports: the simulator and the gateway, started and always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


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
        self.proc = Proc(
            [sys.executable, "-m", "gateway", "sim", "--port", str(self.port), *flags], name="sim"
        )
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
        args = [sys.executable, "-m", "gateway", "serve", "--port", str(self.port)]
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
        return [line for line in self.proc.output().splitlines() if line.strip()]

    def stop(self) -> None:
        self.proc.stop()
