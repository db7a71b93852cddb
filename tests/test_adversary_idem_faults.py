"""Adversary: the Idempotency-Key promise of docs/jobs.md under Redis faults that hit one exact
call of a keyed submission (gateway/jobs/service.py ``submit_job``, ``_submit_job``).

The faults are injected by a small TCP proxy between one gateway and a private redis-server: it
reads the RESP commands the gateway sends and, on a chosen command, either cuts the connection
before forwarding it (what a Redis restart looks like to the client: the command was not run,
the next call reconnects to a Redis with its data, appendonly on) or forwards it and withholds
every reply on that connection for a while (Redis, the network or the replica stalled after the
command ran: the client's 5 s socket timeout fires with the reply unread).

Written by an adversary against the submission as it was (lease, record and queue entry in three
calls: a lost reply left a leaked lease, a record never queued answered 202, or a key let go under
a job that existed, so the retry made a second one); the job is now made by one script (the key's
check, the lease, the record and the queue entry: ``SUBMIT_JOB``), and a lost reply is resolved by
reading the record back. Each test hits one exact call of that flow.
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.jobs_helpers import poll, private_redis, sim_jobs_config
from tests.procs import Gateway, Sim, free_port

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
IVY = "sk-ivy-" + "i" * 24
PASS, CUT, HOLD, STOP = "pass", "cut", "hold", "stop"
Rule = Callable[[list[bytes]], str]


def _commands(buf: bytearray) -> Iterator[list[bytes]]:
    """Pop the complete RESP arrays (commands) at the start of ``buf``."""
    while buf[:1] == b"*":
        end = buf.find(b"\r\n")
        if end < 0:
            return
        n, pos, args = int(buf[1:end]), end + 2, []
        for _ in range(n):
            end = buf.find(b"\r\n", pos)
            if end < 0 or buf[pos : pos + 1] != b"$":
                return
            size = int(buf[pos + 1 : end])
            if len(buf) < end + 2 + size + 2:
                return
            args.append(bytes(buf[end + 2 : end + 2 + size]))
            pos = end + 2 + size + 2
        del buf[:pos]
        yield args


class FaultProxy:
    """127.0.0.1:port -> the private Redis; ``rule(args)`` decides each command's fate."""

    def __init__(self, upstream_port: int, hold_seconds: float = 6.5) -> None:
        self.upstream = upstream_port
        self.hold_seconds = hold_seconds
        self.rule: Rule = lambda _a: PASS
        self.config: Path | None = None  # the gateway's config, for a second replica
        self.redis: Any = None  # the PrivateRedis behind, for tests that restart it
        self.pause_pid = 0  # STOP: SIGSTOP this process (the gateway), SIGCONT after hold_seconds
        self.seen: list[tuple[str, list[bytes]]] = []
        self.lock = threading.Lock()
        self.port = free_port()
        self.srv = socket.create_server(("127.0.0.1", self.port))
        self.srv.settimeout(0.2)
        self.stopping = threading.Event()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                c, _ = self.srv.accept()
            except OSError:
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                c.close()
                continue
            u.settimeout(None)
            c.settimeout(None)
            self.socks += [c, u]
            held = threading.Event()  # set: replies withheld
            threading.Thread(target=self._up, args=(c, u, held), daemon=True).start()
            threading.Thread(target=self._down, args=(u, c, held), daemon=True).start()

    def _up(self, c: socket.socket, u: socket.socket, held: threading.Event) -> None:
        buf = bytearray()
        try:
            while data := c.recv(65536):
                buf += data
                out = b""
                for args in _commands(buf):
                    with self.lock:
                        fate = self.rule(args)
                        self.seen.append((fate, args[:2]))
                    if fate == CUT:
                        c.close()
                        u.close()
                        return
                    if fate == STOP:
                        os.kill(self.pause_pid, signal.SIGSTOP)
                        threading.Timer(self.hold_seconds, os.kill, (self.pause_pid, signal.SIGCONT)).start()
                    if fate == HOLD:
                        held.set()
                        threading.Timer(self.hold_seconds, held.clear).start()
                    out += _encode(args)
                if out:
                    u.sendall(out)
        except OSError:
            pass
        for s in (c, u):
            s.close()

    def _down(self, u: socket.socket, c: socket.socket, held: threading.Event) -> None:
        try:
            while data := u.recv(65536):
                deadline = time.monotonic() + self.hold_seconds + 1
                while held.is_set() and time.monotonic() < deadline:
                    time.sleep(0.01)
                c.sendall(data)
        except OSError:
            pass
        for s in (c, u):
            s.close()

    def close(self) -> None:
        self.stopping.set()
        self.srv.close()
        for s in self.socks:
            s.close()


def _encode(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _is(args: list[bytes], cmd: bytes, key_part: bytes | None = None, at: int = 1) -> bool:
    if args[0].upper() != cmd:
        return False
    return key_part is None or (len(args) > at and key_part in args[at])


def _script_key(args: list[bytes]) -> bytes:
    """The first key of an EVAL/EVALSHA (b'' for anything else)."""
    if args[0].upper() in (b"EVAL", b"EVALSHA") and len(args) > 3 and args[2] != b"0":
        return args[3]
    return b""


@pytest.fixture(scope="module")
def fast_sim() -> Iterator[Sim]:
    s = Sim(None, "--model", "tiny", "--ttft", "0.01", "--itl", "0.001")
    yield s
    s.stop()


@contextmanager
def faulty(sim: Sim, tmp: Path, **jobs: Any) -> Iterator[tuple[Gateway, FaultProxy, redis.Redis, str]]:
    """One gateway whose jobs Redis is a private redis-server behind a ``FaultProxy``."""
    with private_redis(tmp) as rs:
        proxy = FaultProxy(rs.port)
        prefix = f"test:advidem:{secrets.token_hex(4)}:"
        path, _ = sim_jobs_config(sim, tmp, {IVY: ("ivy", "search")}, 4, prefix, queue=proxy.url, **jobs)
        g = Gateway([], config=path)
        direct = redis.Redis.from_url(rs.url)
        proxy.redis = rs
        proxy.config = path
        try:
            yield g, proxy, direct, prefix
        finally:
            direct.close()
            g.stop()
            proxy.close()


def submit(g: Gateway, idem: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {IVY}", "Prefer": "respond-async", "Idempotency-Key": idem}
    return httpx.post(g.v1 + "/chat/completions", json=BODY, headers=headers, timeout=60)


def job(g: Gateway, jid: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(
        f"{g.v1}/jobs/{jid}", headers={"Authorization": f"Bearer {IVY}"}, timeout=10
    ).json()
    return data


def assert_openai_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body


def jobs_recorded(direct: redis.Redis, prefix: str) -> list[str]:
    return sorted(k.decode() for k in direct.scan_iter(match=f"{prefix}job:job_*") if k.count(b":") == 4)


def leases(direct: redis.Redis, prefix: str) -> list[str]:
    keys = list(direct.scan_iter(match=f"{prefix}quota:job:*"))
    return [m.decode() for k in keys for m in direct.zrange(k, 0, -1)]


def once(rule: Callable[[list[bytes]], bool], fate: str, times: int = 1) -> Rule:
    """A rule: ``fate`` for the first ``times`` commands matching ``rule``, then pass."""
    left = [times]

    def decide(args: list[bytes]) -> str:
        if left[0] > 0 and rule(args):
            left[0] -= 1
            return fate
        return PASS

    return decide


# --------------------------------------------------------------------------- the attacks


def _is_submit(args: list[bytes]) -> bool:
    """The SUBMIT_JOB script (nine keys, the job's record second)."""
    return (
        args[0].upper() in (b"EVAL", b"EVALSHA")
        and len(args) > 4
        and args[2] == b"9"
        and b":job:job_" in args[4]
    )


def _is_claim(args: list[bytes]) -> bool:
    """The Idempotency-Key's compare-and-set script (two keys, the Idempotency-Key first)."""
    return args[0].upper() in (b"EVAL", b"EVALSHA") and args[2:3] == [b"2"] and b":idem:" in _script_key(args)


def _warm(g: Gateway) -> str:
    """One job through, so that the scripts are loaded and a held EVALSHA really runs."""
    warm = submit(g, "warm-up")
    assert warm.status_code == 202, warm.text
    poll(lambda: job(g, warm.json()["id"]), lambda j: j["status"] == "completed", 30, "warm-up")
    return str(warm.json()["id"])


def _one_job_that_runs(
    g: Gateway, direct: redis.Redis, prefix: str, key: str, first: httpx.Response, warm: str
) -> str:
    """The promise after a fault: ``first`` is the job (202) or a clean 503 whose retry is; one
    job was made for ``key``, it completes, its lease is given back, and a new submission of the
    principal (at ``max_active_jobs: 1``) is accepted."""
    answers = [first.status_code]
    if first.status_code != 202:
        assert_openai_error(first, 503, "jobs_unavailable")
        first = poll(lambda: submit(g, key), lambda r: r.status_code == 202, 30, "the retry's 202")
        answers.append(first.status_code)
    jid = first.json()["id"]
    assert submit(g, key).json()["id"] == jid, answers
    made = {k.rsplit(":", 1)[1] for k in jobs_recorded(direct, prefix)} - {warm}
    assert made == {jid}, (made, answers)
    ended = ("completed", "failed", "cancelled", "expired")
    done = poll(lambda: job(g, jid), lambda j: j["status"] in ended, 30, f"{jid} ran ({answers})")
    assert done["status"] == "completed", done
    assert leases(direct, prefix) == [], leases(direct, prefix)
    after = submit(g, f"after-{key}")
    assert after.status_code == 202, (after.text, answers)
    return jid


@pytest.mark.parametrize("fault", [HOLD, CUT, STOP])
def test_a_submission_whose_script_reply_is_lost_makes_one_job_that_runs(
    fault: str, fast_sim: Sim, tmp_path: Path
) -> None:
    """The SUBMIT_JOB script's reply is lost: HOLD (it ran; the reply comes after the 5 s socket
    timeout), CUT (the connection drops before it reaches Redis: not run), STOP (the replica is
    stopped 6.5 s as it sends it). Before, the lease, record and queue entry were three calls
    and a lost reply leaked the lease (429 with nothing active, for a day), or answered 202 for
    a record never queued."""
    with faulty(fast_sim, tmp_path, max_active_jobs=1) as (g, proxy, direct, prefix):
        warm = _warm(g)
        proxy.pause_pid = g.proc.pid
        proxy.rule = once(_is_submit, fault)
        first = submit(g, f"lost-{fault}")
        assert any(f == fault for f, _ in proxy.seen), "the fault did not hit the submission"
        _one_job_that_runs(g, direct, prefix, f"lost-{fault}", first, warm)


def test_a_lost_reply_whose_read_back_fails_too_keeps_the_key_for_its_job(
    fast_sim: Sim, tmp_path: Path
) -> None:
    """The script ran (reply held past the timeout), and the read-back that would tell whether
    it did is cut too (Redis restarting). The submission cannot tell, so it answers 503 and
    keeps the key: the retry finds the job. Before, a failed look-up let the key go and the
    retry made a second job; both ran."""
    with faulty(fast_sim, tmp_path, max_active_jobs=1) as (g, proxy, direct, prefix):
        warm = _warm(g)
        state = {"held": False, "cut": False}

        def rule(args: list[bytes]) -> str:
            if not state["held"] and _is_submit(args):
                state["held"] = True
                return HOLD
            if state["held"] and not state["cut"] and _is(args, b"HGETALL", b":job:job_"):
                state["cut"] = True
                return CUT
            return PASS

        proxy.rule = rule
        first = submit(g, "read-back-cut")
        assert state == {"held": True, "cut": True}, state
        _one_job_that_runs(g, direct, prefix, "read-back-cut", first, warm)


def test_two_stalls_claim_then_script_make_one_job(fast_sim: Sim, tmp_path: Path) -> None:
    """The claim's reply stalls (the claim ran), the submission claims again and runs its
    script, whose reply stalls too. Before, the second interruption let the key go without
    looking for the job, and the retry made a second one."""
    with faulty(fast_sim, tmp_path, max_active_jobs=1) as (g, proxy, direct, prefix):
        warm = _warm(g)
        state = {"claim": False, "script": False}

        def rule(args: list[bytes]) -> str:
            if not state["claim"] and _is_claim(args):
                state["claim"] = True
                return HOLD
            if state["claim"] and not state["script"] and _is_submit(args):
                state["script"] = True
                return HOLD
            return PASS

        proxy.rule = rule
        first = submit(g, "stalled-twice")
        assert state == {"claim": True, "script": True}, state
        _one_job_that_runs(g, direct, prefix, "stalled-twice", first, warm)


def test_redis_killed_as_the_script_is_sent_makes_one_job_that_runs(fast_sim: Sim, tmp_path: Path) -> None:
    """Redis is killed (-9) just before the script reaches it and is back 1.5 s later with its
    data (appendonly). Before, the record written by one call and the queue entry lost with the
    next left a job answered 202 that never ran."""
    with faulty(fast_sim, tmp_path, max_active_jobs=1) as (g, proxy, direct, prefix):
        warm = _warm(g)
        rs = proxy.redis
        done = [False]

        def rule(args: list[bytes]) -> str:
            if not done[0] and _is_submit(args):
                done[0] = True
                rs.proc.kill()
                rs.proc.wait(10)
                threading.Timer(1.5, rs.start).start()
                return CUT
            return PASS

        proxy.rule = rule
        first = submit(g, "killed")
        assert done[0]
        _one_job_that_runs(g, direct, prefix, "killed", first, warm)


def test_writes_paused_past_the_timeout_under_racing_copies_make_one_job_and_leak_no_lease(
    fast_sim: Sim, tmp_path: Path
) -> None:
    """``CLIENT PAUSE 6500 WRITE`` on the private Redis while four copies of one keyed
    submission race (``max_active_jobs: 1``): every copy answers the one job (or a clean 503
    whose retry does), it completes, no lease is left, and the principal can submit again."""
    with faulty(fast_sim, tmp_path, max_active_jobs=1) as (g, _proxy, direct, prefix):
        warm = _warm(g)
        direct.execute_command("CLIENT", "PAUSE", "6500", "WRITE")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            copies = list(pool.map(lambda _i: submit(g, "paused-writes"), range(4)))
        for c in copies:
            if c.status_code != 202:
                assert_openai_error(c, 503, "jobs_unavailable")
        jid = _one_job_that_runs(g, direct, prefix, "paused-writes", copies[0], warm)
        assert {c.json()["id"] for c in copies if c.status_code == 202} <= {jid}


@pytest.mark.parametrize("fault", [HOLD, "client-pause"])
def test_a_stalled_script_on_one_replica_and_a_copy_on_another_make_one_job(
    fault: str, fast_sim: Sim, tmp_path: Path
) -> None:
    """Two replicas. A's script stalls past the 5 s socket timeout (HOLD: it ran, the reply
    is late; ``client-pause``: ``CLIENT PAUSE 6500 WRITE`` just before it reaches Redis); a copy
    goes to B 0.3 s later. Every answer names one job, which runs. Before, a timed-out WATCHed
    transaction read as a takeover answered 202 for a record never queued."""
    with faulty(fast_sim, tmp_path, max_active_jobs=1) as (a, proxy, direct, prefix):
        assert proxy.config is not None
        warm = _warm(a)
        b = Gateway([], config=proxy.config)
        try:
            held = threading.Event()

            def rule(args: list[bytes]) -> str:
                if not held.is_set() and _is_submit(args):
                    held.set()
                    if fault == HOLD:
                        return HOLD
                    direct.execute_command("CLIENT", "PAUSE", "6500", "WRITE")
                return PASS

            proxy.rule = rule
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                on_a = pool.submit(submit, a, "two-replicas")
                assert held.wait(10), "A never sent its script"
                time.sleep(0.3)  # B's copy arrives while A's script stalls
                on_b = submit(b, "two-replicas")
                first_a = on_a.result(timeout=40)
            jid = _one_job_that_runs(a, direct, prefix, "two-replicas", first_a, warm)
            if on_b.status_code == 202:
                assert on_b.json()["id"] == jid
            else:
                assert_openai_error(on_b, 503, "jobs_unavailable")
        finally:
            b.stop()
