"""Shared pieces of the jobs tests: config, keys, JSONL, polling, a private redis-server."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import redis
import yaml

from tests.procs import Gateway, Sim, free_port

ALICE = "sk-alice-" + "a" * 24
BOB = "sk-bob-" + "b" * 24
CAROL = "sk-carol-" + "c" * 24  # team research: may use `tiny` only

T = TypeVar("T")


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def jobs_config(
    tmp: Path,
    queue: str = "redis://127.0.0.1:6379/0",
    prefix: str | None = None,
    files: Path | None = None,
    **jobs: Any,
) -> tuple[Path, str]:
    """A gateway config with jobs on, three API keys, and its Redis key prefix."""
    prefix = prefix or f"test:jobs:{secrets.token_hex(4)}:"
    cfg = {
        "auth": {
            "api_keys": [
                {"sha256": sha(ALICE), "subject": "alice", "team": "search"},
                {"sha256": sha(BOB), "subject": "bob", "team": "search"},
                {"sha256": sha(CAROL), "subject": "carol", "team": "research"},
            ]
        },
        "teams": {"search": {}, "research": {"models": ["tiny"]}},
        "jobs": {
            "enabled": True,
            "queue": queue,
            "key_prefix": prefix,
            "files": f"file://{files or tmp / 'files'}",
            "visibility_timeout": 3,
            "max_deliveries": 3,
            "concurrency": 4,
            **jobs,
        },
    }
    path = tmp / f"gateway-{secrets.token_hex(3)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, prefix


def sim_jobs_config(
    sim: Sim,
    tmp: Path,
    keys: Mapping[str, tuple[str, str]] = {},
    max_in_flight: int = 1,
    prefix: str | None = None,
    **jobs: Any,
) -> tuple[Path, str]:
    """``jobs_config`` in front of ``sim`` (``max_in_flight`` slots), with more API keys:
    ``keys`` maps a key to its (subject, team)."""
    path, prefix = jobs_config(tmp, prefix=prefix, **jobs)
    cfg = yaml.safe_load(path.read_text())
    cfg["backends"] = [{"url": sim.url, "max_in_flight": max_in_flight}]
    cfg["auth"]["api_keys"] += [{"sha256": sha(k), "subject": s, "team": t} for k, (s, t) in keys.items()]
    path.write_text(yaml.safe_dump(cfg))
    return path, prefix


def clean_prefix(prefix: str, url: str = "redis://127.0.0.1:6379/0") -> None:
    """Delete every key under ``prefix`` (a test's jobs, files, leases and queue)."""
    r = redis.Redis.from_url(url)
    try:
        for key in r.scan_iter(match=prefix + "*"):
            r.delete(key)
    finally:
        r.close()


class Pair:
    """Two gateway replicas on one Redis and one file store (``config``), or one when
    ``replicas`` is 1 (then ``a`` and ``b`` are the same)."""

    def __init__(self, config: Path, prefix: str, store: Path, replicas: int = 2) -> None:
        self.config, self.prefix, self.store = config, prefix, store
        self.a = Gateway([], config=config)
        try:
            self.b = Gateway([], config=config) if replicas == 2 else self.a
        except BaseException:
            self.a.stop()
            raise

    @property
    def both(self) -> tuple[Gateway, Gateway]:
        return self.a, self.b

    def stop(self) -> None:
        for g in {id(self.a): self.a, id(self.b): self.b}.values():
            if g.proc.alive():
                os.kill(g.proc.pid, signal.SIGCONT)  # never leave a stopped process behind
            g.stop()
        clean_prefix(self.prefix)


def chat_lines(n: int, model: str = "tiny", start: int = 0, max_tokens: int = 5) -> bytes:
    out = []
    for i in range(start, start + n):
        out.append(
            orjson.dumps(
                {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": model,
                        "messages": [{"role": "user", "content": f"hello {i}"}],
                        "max_tokens": max_tokens,
                    },
                }
            )
        )
    return b"\n".join(out) + b"\n"


def poll(fn: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str) -> T:
    """Call ``fn`` until ``done(result)``; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if done(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached after {timeout}s; last: {last}")


def jsonl(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in raw.splitlines() if line.strip()]


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server is not installed (apt install redis-server): the jobs tests need it")
    return path


@contextmanager
def private_redis(tmp: Path, *extra: str) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp, *extra)
    r.start()
    try:
        yield r
    finally:
        r.stop()


class PrivateRedis:
    """A redis-server of the test's own, with appendonly on, that the test may stop and restart.
    ``extra`` arguments come last (a later option wins: ``--appendonly no``, ``--requirepass``)."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.port = free_port()
        self.dir = tmp / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        password = None
        if "--requirepass" in self.extra:
            password = self.extra[self.extra.index("--requirepass") + 1]
        client = redis.Redis(port=self.port, password=password)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None


def env_without_proxy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
