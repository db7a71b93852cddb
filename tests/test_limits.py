"""Rate limits through real processes: RPM, TPM and requests in flight, per principal and per team.

Every test talks to a real gateway process (YAML config: HS256 JWT with an inline secret and
hashed API keys) in front of real simulator processes, over real sockets. Two simulators sit
behind each gateway: ``tiny`` answers at once, ``slow`` streams one token every 20 ms.

The limit tests run twice, on ``memory://`` and on ``redis://`` storage. Tests marked "needs
Redis" use the real Redis at 127.0.0.1:6379 (database 9, keys carrying this run's unique id,
deleted afterwards); they skip with a message when Redis is unreachable, or fail when the
environment sets ``REDIS_REQUIRED=1``. Redis failures are simulated with a TCP proxy owned by the
test (forward / down / blackhole); the machine's Redis server is never touched.

Token arithmetic used throughout (gateway/pipeline/limit.py): a request reserves
``ceil(body bytes / 4) + max_tokens``; after the response the counter is corrected to the real
usage. ``x-ratelimit-remaining-tokens`` of a response is ``limit - (earlier charges + this
request's reservation)``, so the next response's header reveals what the previous one cost.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from jose import jwt as jose_jwt

from tests.procs import Gateway, Sim, free_port

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 9
UID = secrets.token_hex(4)  # every subject, team and Redis key of this run carries it
SECRET = secrets.token_urlsafe(32)
MSG = [{"role": "user", "content": "alpha beta gamma delta"}]

TIERS: dict[str, dict[str, int]] = {
    "rpm3": {"requests_per_minute": 3},
    "wide": {"requests_per_minute": 1000},
    "tpm": {"requests_per_minute": 1000, "tokens_per_minute": 3000},
    "both": {"requests_per_minute": 10, "tokens_per_minute": 50000},
    "conc2": {"requests_per_minute": 1000, "max_concurrent": 2},
    "rpm50": {"requests_per_minute": 50},
    "bench": {"requests_per_minute": 10**6, "tokens_per_minute": 10**9, "max_concurrent": 1000},
}
TEAM_RPM = f"{UID}-team-rpm"  # 4 requests a minute for all its members together
TEAM_TPM = f"{UID}-team-tpm"  # 4000 tokens a minute for all its members together
TEAM_OVERRIDE = f"{UID}-team-override"  # its rpm3 members get 5 requests a minute
TEAM_RPM_LIMIT, TEAM_TPM_LIMIT, OVERRIDE_RPM = 4, 4000, 5
TEAMS: dict[str, Any] = {
    TEAM_RPM: {"limits": {"requests_per_minute": TEAM_RPM_LIMIT}},
    TEAM_TPM: {"limits": {"tokens_per_minute": TEAM_TPM_LIMIT}},
    TEAM_OVERRIDE: {"tiers": {"rpm3": {"requests_per_minute": OVERRIDE_RPM}}},
}
# API keys (only their sha256 goes into the config): name -> (key, team, tier)
API_KEYS: dict[str, tuple[str, str | None, str]] = {
    "team-a": (f"sk-{UID}-team-a", TEAM_RPM, "wide"),
    "team-b": (f"sk-{UID}-team-b", TEAM_RPM, "wide"),
    "outsider": (f"sk-{UID}-outsider", f"{UID}-elsewhere", "wide"),
    "global": (f"sk-{UID}-global", None, "rpm50"),
}

RESET_RE = re.compile(r"^(?:(\d+)ms|(?:(\d+)m)?(\d+)s)$")


# ----------------------------------------------------------------------------- helpers


def subject(name: str) -> str:
    return f"{UID}-{name}"


def token(sub: str, tier: str | None = None, team: str | None = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 3600}
    if tier is not None:
        claims["tier"] = tier
    if team is not None:
        claims["team"] = team
    return str(jose_jwt.encode(claims, SECRET, algorithm="HS256"))


def api_key(name: str) -> str:
    return API_KEYS[name][0]


def write_config(
    path: Path,
    storage: str,
    *,
    on_error: str = "open",
    limits: bool = True,
) -> Path:
    cfg: dict[str, Any] = {
        "auth": {
            "jwt": {"algorithms": ["HS256"], "secret": SECRET},
            "api_keys": [
                {
                    "sha256": hashlib.sha256(key.encode()).hexdigest(),
                    "subject": subject(name),
                    "team": team,
                    "tier": tier,
                }
                for name, (key, team, tier) in API_KEYS.items()
            ],
        },
        "rate_limits": {"storage": storage, "on_storage_error": on_error},
    }
    if limits:
        cfg["tiers"] = TIERS
        cfg["teams"] = TEAMS
    path.write_text(yaml.safe_dump(cfg))
    return path


def body(max_tokens: int = 8, *, model: str = "tiny", stream: bool = False, pad: int = 0) -> bytes:
    """The exact request bytes, so the test knows the reservation (``pad`` adds prompt bytes)."""
    content = MSG[0]["content"] + (" x" * pad)
    b: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    b["max_tokens"] = max_tokens
    if stream:
        b["stream"] = True
    return json.dumps(b).encode()


def reserved(raw: bytes) -> int:
    return math.ceil(len(raw) / 4) + json.loads(raw)["max_tokens"]


def body_reserving(tokens: int, **kw: Any) -> bytes:
    """A request whose reservation is exactly ``tokens``."""
    for pad in range(4):  # the body's length moves with max_tokens' digits; padding evens it out
        guess = tokens - math.ceil(len(body(max_tokens=1, pad=pad, **kw)) / 4)
        for m in range(guess, guess - 4, -1):
            raw = body(max_tokens=m, pad=pad, **kw)
            if reserved(raw) == tokens:
                return raw
    raise AssertionError(f"cannot build a request reserving exactly {tokens} tokens")


def headers_for(cred: str, rid: str | None = None) -> dict[str, str]:
    h = {"authorization": f"Bearer {cred}", "content-type": "application/json"}
    if rid is not None:
        h["x-request-id"] = rid
    return h


def post(gw: Gateway, cred: str, raw: bytes, rid: str | None = None, timeout: float = 10) -> httpx.Response:
    return httpx.post(
        gw.v1 + "/chat/completions", content=raw, headers=headers_for(cred, rid), timeout=timeout
    )


def usage_of(r: httpx.Response) -> int:
    u = r.json()["usage"]
    return int(u["prompt_tokens"]) + int(u["completion_tokens"])


def reset_seconds(text: str) -> float:
    m = RESET_RE.match(text)
    assert m, f"reset header {text!r} is not OpenAI's format (`250ms`, `7s`, `1m0s`)"
    if m.group(1) is not None:
        return int(m.group(1)) / 1000
    return int(m.group(2) or 0) * 60 + int(m.group(3))


def assert_limit_headers(r: httpx.Response, *, requests: int | None, tokens: int | None) -> dict[str, int]:
    """The x-ratelimit-* headers of a success: present exactly for the limits that apply, sane."""
    out: dict[str, int] = {}
    for kind, limit in (("requests", requests), ("tokens", tokens)):
        names = [f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset")]
        if limit is None:
            assert not any(n in r.headers for n in names), dict(r.headers)
            continue
        assert all(n in r.headers for n in names), f"missing {kind} headers: {dict(r.headers)}"
        assert int(r.headers[names[0]]) == limit
        remaining = int(r.headers[names[1]])
        assert 0 <= remaining < limit
        assert 0 < reset_seconds(r.headers[names[2]]) <= 60
        out[kind] = remaining
    return out


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    return dict(err)


def retry_after(r: httpx.Response) -> int:
    assert "retry-after" in r.headers, dict(r.headers)
    value = int(r.headers["retry-after"])
    assert 1 <= value <= 60
    return value


def sdk(gw: Gateway, cred: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=cred, max_retries=0, timeout=10)


def audit_line(gw: Gateway, rid: str, timeout: float = 5) -> dict[str, Any]:
    """The gateway's audit line of one request; written after the limiter settled it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in reversed(gw.log_lines()):
            if rid not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "request" and rec.get("request_id") == rid:
                return dict(rec)
        time.sleep(0.02)
    raise AssertionError(f"no audit line for {rid}:\n" + "\n".join(gw.log_lines()[-20:]))


def storage_errors(gw: Gateway) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    m = re.search(r"^gateway_ratelimit_storage_errors_total (\S+)$", text, re.M)
    assert m, "gateway_ratelimit_storage_errors_total is not exported"
    return float(m.group(1))


class OpenStream:
    """A streamed request whose headers arrived; read it to the end or cut it off."""

    def __init__(self, gw: Gateway, cred: str, raw: bytes, rid: str | None = None) -> None:
        self.client = httpx.Client(timeout=30)
        req = self.client.build_request(
            "POST", gw.v1 + "/chat/completions", content=raw, headers=headers_for(cred, rid)
        )
        self.response = self.client.send(req, stream=True)
        self.status = self.response.status_code
        self.lines = self.response.iter_lines()

    def events(self, n: int) -> list[str]:
        out: list[str] = []
        for line in self.lines:
            if line.startswith("data: "):
                out.append(line[6:])
                if len(out) == n:
                    break
        return out

    def finish(self) -> list[str]:
        out = [line[6:] for line in self.lines if line.startswith("data: ")]
        self.close()
        return out

    def close(self) -> None:
        self.response.close()
        self.client.close()


def redis_reachable() -> bool:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def require_redis() -> None:
    if redis_reachable():
        return
    message = f"needs Redis at {REDIS_HOST}:{REDIS_PORT} (not reachable)"
    if os.environ.get("REDIS_REQUIRED") == "1":
        pytest.fail(message + " and REDIS_REQUIRED=1")
    pytest.skip(message + "; set REDIS_REQUIRED=1 to make this a failure")


def delete_run_keys() -> None:
    if not redis_reachable():
        return
    import redis

    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=2)
    try:
        keys = list(r.scan_iter(match=f"*{UID}*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


def redis_value(key_suffix: str) -> int | None:
    import redis

    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=2)
    try:
        keys = list(r.scan_iter(match=f"*{key_suffix}", count=1000))
        assert len(keys) <= 1, keys
        return int(r.get(keys[0]) or 0) if keys else None
    finally:
        r.close()


class RedisProxy:
    """127.0.0.1:<port> in front of the real Redis, owned by the test.

    ``forward``: a transparent TCP relay; ``down``: nothing listens (connection refused, open
    connections are cut); ``blackhole``: connections are accepted and never answered.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.mode = "down"
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def set(self, mode: str) -> None:
        self._shutdown()
        self.mode = mode
        if mode == "down":
            return
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        ls.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, args=(ls, mode, self._stop), daemon=True)
        self._thread.start()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.append(s)

    def _accept(self, ls: socket.socket, mode: str, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    conn, _ = ls.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                conn.settimeout(None)
                self._track(conn)
                if mode == "blackhole":
                    threading.Thread(target=self._drain, args=(conn,), daemon=True).start()
                    continue
                try:
                    up = socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=2)
                except OSError:
                    conn.close()
                    continue
                up.settimeout(None)
                self._track(up)
                threading.Thread(target=self._pump, args=(conn, up), daemon=True).start()
                threading.Thread(target=self._pump, args=(up, conn), daemon=True).start()
        finally:
            ls.close()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _shutdown(self) -> None:
        if self._stop is not None and self._thread is not None:
            self._stop.set()
            self._thread.join(5)
        self._stop = self._thread = None
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._shutdown()
        self.mode = "down"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sims() -> Iterator[tuple[Sim, Sim]]:
    fast = Sim(None, "--ttft", "0", "--itl", "0", "--max-model-len", "8192")
    slow = Sim(
        None,
        *("--model", "slow", "--ttft", "0.05", "--itl", "0.02"),
        *("--output-tokens", "2000", "--max-model-len", "8192"),
    )
    yield fast, slow
    fast.stop()
    slow.stop()


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("limits")
    delete_run_keys()


def _start(sims: tuple[Sim, Sim], config: Path) -> Gateway:
    return Gateway([sims[0].url, sims[1].url], config=config)


@pytest.fixture(scope="module")
def mem_gw(sims: tuple[Sim, Sim], config_dir: Path) -> Iterator[Gateway]:
    g = _start(sims, write_config(config_dir / "memory.yaml", "memory://"))
    yield g
    g.stop()


@pytest.fixture(scope="module")
def redis_gw(sims: tuple[Sim, Sim], config_dir: Path) -> Iterator[Gateway]:
    """Needs Redis: a gateway on redis://127.0.0.1:6379/9."""
    require_redis()
    storage = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    g = _start(sims, write_config(config_dir / "redis.yaml", storage))
    yield g
    g.stop()


@pytest.fixture(scope="module")
def redis_gw2(sims: tuple[Sim, Sim], config_dir: Path, redis_gw: Gateway) -> Iterator[Gateway]:
    """Needs Redis: a second gateway process on the same Redis and config as ``redis_gw``."""
    g = _start(sims, config_dir / "redis.yaml")
    yield g
    g.stop()


@pytest.fixture(scope="module")
def nolimit_gw(sims: tuple[Sim, Sim], config_dir: Path) -> Iterator[Gateway]:
    g = _start(sims, write_config(config_dir / "nolimits.yaml", "memory://", limits=False))
    yield g
    g.stop()


@pytest.fixture(scope="module", params=["memory", "redis"])
def gw(request: pytest.FixtureRequest) -> Gateway:
    """The limit tests run on both storages (the redis variant needs Redis)."""
    g: Gateway = request.getfixturevalue("mem_gw" if request.param == "memory" else "redis_gw")
    g.storage = request.param  # type: ignore[attr-defined]
    return g


@pytest.fixture
def who(request: pytest.FixtureRequest, gw: Gateway) -> str:
    """A subject unique to this test and storage (counters never collide)."""
    return subject(f"{request.node.originalname}-{gw.storage}")  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- RPM


def test_rpm_per_principal_headers_429_and_sdk_error(gw: Gateway, who: str) -> None:
    cred = token(who, tier="rpm3")
    remaining = []
    for _ in range(3):
        r = post(gw, cred, body())
        assert r.status_code == 200, r.text
        remaining.append(assert_limit_headers(r, requests=3, tokens=None)["requests"])
    assert remaining == [2, 1, 0]

    r = post(gw, cred, body())
    err = assert_openai_error(r, 429, "rate_limit_exceeded")
    assert err["type"] == "rate_limit_error"
    assert err["param"] == "requests"
    assert "requests per minute" in err["message"] and "limit 3" in err["message"]
    assert "principal" in err["message"]
    wait = retry_after(r)
    # The 429 describes the limit that refused it, like a success does.
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert abs(reset_seconds(r.headers["x-ratelimit-reset-requests"]) - wait) <= 1

    with pytest.raises(openai.RateLimitError) as info:
        sdk(gw, cred).chat.completions.create(model="tiny", messages=MSG)  # type: ignore[arg-type]
    assert info.value.status_code == 429
    assert info.value.code == "rate_limit_exceeded"

    # The limit is this principal's: another principal of the same tier is untouched.
    other = post(gw, token(who + "-other", tier="rpm3"), body())
    assert other.status_code == 200
    assert assert_limit_headers(other, requests=3, tokens=None)["requests"] == 2


def test_retry_after_is_the_real_wait(gw: Gateway, who: str, request: pytest.FixtureRequest) -> None:
    """Retry-After of an RPM 429 is the time until the window (started by the first hit) ends.

    A client that sleeps Retry-After seconds must not meet the same 429 again, so the header
    must not be shorter than the real wait. The 429 is provoked 0.75 s into the window (or
    into a later second of it), where the real wait is about 59.25 s: the right answer is 60.
    """
    cred = token(who, tier="rpm3")
    t0 = time.time()
    for _ in range(3):
        assert post(gw, cred, body()).status_code == 200
    # Land 0.75 s past a whole second of the window, even on a slow machine.
    time.sleep(t0 + max(0, math.ceil(time.time() - t0 - 0.75)) + 0.75 - time.time())
    r = post(gw, cred, body())
    t1 = time.time()
    assert_openai_error(r, 429, "rate_limit_exceeded")
    real_wait_at_least = 60 - (t1 - t0)  # the window started after t0 and is checked before t1
    value = retry_after(r)
    assert value >= real_wait_at_least, f"Retry-After {value} < real wait {real_wait_at_least:.2f}s"
    assert value <= real_wait_at_least + 1.5
    m = re.search(r"Try again in (\S+)\.", r.json()["error"]["message"])
    assert m and abs(reset_seconds(m.group(1)) - value) <= 1


def test_rpm_per_team_shared_by_its_principals(gw: Gateway) -> None:
    # The memory and the redis run use the same team: their counters live in different storages.
    a, b, outsider = api_key("team-a"), api_key("team-b"), api_key("outsider")
    for cred in (a, b, a, b):
        r = post(gw, cred, body())
        assert r.status_code == 200, r.text
        # the principal's own tier limit (wide: 1000/min) is what the headers describe
        assert_limit_headers(r, requests=1000, tokens=None)
    for cred in (a, b):
        r = post(gw, cred, body())
        err = assert_openai_error(r, 429, "rate_limit_exceeded")
        assert err["param"] == "requests"
        assert "(team)" in err["message"] and f"limit {TEAM_RPM_LIMIT}" in err["message"]
        retry_after(r)
    # Another team's principal of the same tier is not affected.
    assert post(gw, outsider, body()).status_code == 200


def test_team_tier_override_applies(gw: Gateway, who: str) -> None:
    cred = token(who, tier="rpm3", team=TEAM_OVERRIDE)
    for i in range(OVERRIDE_RPM):
        r = post(gw, cred, body())
        assert r.status_code == 200, f"request {i + 1}: {r.text}"
        assert assert_limit_headers(r, requests=OVERRIDE_RPM, tokens=None)["requests"] == OVERRIDE_RPM - i - 1
    r = post(gw, cred, body())
    err = assert_openai_error(r, 429, "rate_limit_exceeded")
    assert f"limit {OVERRIDE_RPM}" in err["message"]
    # The same tier outside that team keeps the tier's own limit.
    r = post(gw, token(who + "-plain", tier="rpm3"), body())
    assert_limit_headers(r, requests=3, tokens=None)


# ----------------------------------------------------------------------------- TPM


def test_tpm_reservation_over_the_remaining_budget_is_429_tokens(gw: Gateway, who: str) -> None:
    limit = TIERS["tpm"]["tokens_per_minute"]
    cred = token(who, tier="tpm")
    first = body(max_tokens=2000)
    r = post(gw, cred, first)
    assert r.status_code == 200, r.text
    assert assert_limit_headers(r, requests=1000, tokens=limit)["tokens"] == limit - reserved(first)
    used = usage_of(r)  # reconciled: the budget left is limit - used

    # One token more than what is left: refused, and nothing is charged for it.
    over = body_reserving(limit - used + 1)
    r = post(gw, cred, over)
    err = assert_openai_error(r, 429, "rate_limit_exceeded")
    assert err["param"] == "tokens"
    assert "tokens per minute" in err["message"] and f"limit {limit}" in err["message"]
    retry_after(r)
    assert r.headers["x-ratelimit-limit-tokens"] == str(limit)

    # Exactly what is left: served (the refusal above was rolled back, tokens and requests).
    exact = body_reserving(limit - used)
    r = post(gw, cred, exact)
    assert r.status_code == 200, r.text
    h = assert_limit_headers(r, requests=1000, tokens=limit)
    assert h["tokens"] == 0
    assert h["requests"] == 1000 - 2  # the refused request did not count

    # A request that could never fit, whatever the wait, says so.
    # Its own code, no Retry-After, and `x-should-retry: false` (the OpenAI SDKs do not retry it).
    r = post(gw, token(who + "-huge", tier="tpm"), body(max_tokens=limit + 1))
    err = assert_openai_error(r, 429, "tokens_exceed_limit")
    assert err["param"] == "tokens" and "max_tokens" in err["message"]
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers


def test_tpm_per_team_shared_and_reconciled(gw: Gateway, who: str) -> None:
    a = token(who + "-a", tier="wide", team=TEAM_TPM)
    b = token(who + "-b", tier="wide", team=TEAM_TPM)
    r = post(gw, a, body(max_tokens=3000))  # reserves most of the team's 4000
    assert r.status_code == 200, r.text
    used = usage_of(r)
    r = post(gw, b, body_reserving(TEAM_TPM_LIMIT - used + 1))
    err = assert_openai_error(r, 429, "rate_limit_exceeded")
    assert err["param"] == "tokens" and "(team)" in err["message"]
    # Exactly the team's remainder passes: a's 3000-token reservation was reconciled to its usage.
    r = post(gw, b, body_reserving(TEAM_TPM_LIMIT - used))
    assert r.status_code == 200, r.text


def test_tpm_reconciled_after_plain_response(gw: Gateway, who: str) -> None:
    limit = TIERS["both"]["tokens_per_minute"]
    cred = token(who, tier="both")
    first = body(max_tokens=1000)
    r = post(gw, cred, first)
    assert r.status_code == 200
    assert assert_limit_headers(r, requests=10, tokens=limit)["tokens"] == limit - reserved(first)
    used = usage_of(r)
    assert used < reserved(first) - 900  # the sim answers 16 tokens

    second = body(max_tokens=500, pad=3)
    r = post(gw, cred, second)
    assert r.status_code == 200
    # charged the real usage, not the 1000-token reservation
    assert assert_limit_headers(r, requests=10, tokens=limit)["tokens"] == limit - used - reserved(second)


def test_tpm_reconciled_after_stream_from_usage_chunk_the_gateway_asked_for(gw: Gateway, who: str) -> None:
    limit = TIERS["both"]["tokens_per_minute"]
    cred = token(who, tier="both")
    plain = post(gw, cred, body(max_tokens=1000))
    assert plain.status_code == 200
    used = usage_of(plain)  # the stream below has the same prompt and length: same usage

    streamed = body(max_tokens=1000, stream=True)  # no stream_options: the gateway adds include_usage
    s = OpenStream(gw, cred, streamed)
    assert s.status == 200
    h = assert_limit_headers(s.response, requests=10, tokens=limit)
    assert h["tokens"] == limit - used - reserved(streamed)
    events = s.finish()
    assert events[-1] == "[DONE]"
    assert not any('"usage"' in e and '"choices":[]' in e for e in events), "usage chunk not stripped"

    third = body(max_tokens=10)
    r = post(gw, cred, third)
    assert r.status_code == 200
    assert assert_limit_headers(r, requests=10, tokens=limit)["tokens"] == limit - 2 * used - reserved(third)


def test_tpm_charge_after_client_disconnect_is_what_was_relayed(
    gw: Gateway, who: str, sims: tuple[Sim, Sim]
) -> None:
    limit = TIERS["both"]["tokens_per_minute"]
    cred = token(who, tier="both")
    raw = body(max_tokens=1000, model="slow", stream=True)
    rid = f"{who}-cut"
    s = OpenStream(gw, cred, raw, rid)
    assert s.status == 200
    assert len(s.events(5)) == 5
    s.close()  # client goes away mid-stream (the slow model has ~20 s left to say)
    line = audit_line(gw, rid)  # logged after the limiter settled the request
    assert line["client_disconnected"] is True
    assert any(a.startswith(rid) for a in sims[1].stats()["aborted"]), "vLLM was not told to abort"

    nxt = body(max_tokens=10)
    r = post(gw, cred, nxt)
    assert r.status_code == 200
    charged = limit - reserved(nxt) - assert_limit_headers(r, requests=10, tokens=limit)["tokens"]
    prompt_estimate = math.ceil(len(raw) / 4)
    # prompt estimate + one token per relayed event (the client read 5; a few more may have left)
    assert prompt_estimate + 5 <= charged <= prompt_estimate + 40, charged
    assert charged < 1000 // 10


# ----------------------------------------------------------------------------- concurrency


def test_concurrency_cap(gw: Gateway, who: str) -> None:
    cred = token(who, tier="conc2")
    slow = body(max_tokens=40, model="slow", stream=True)  # ~0.85 s each
    streams = [OpenStream(gw, cred, slow) for _ in range(2)]
    try:
        assert [s.status for s in streams] == [200, 200]
        r = post(gw, cred, body())
        err = assert_openai_error(r, 429, "concurrency_limit_exceeded")
        assert err["type"] == "rate_limit_error"
        assert "at most 2" in err["message"]
        assert retry_after(r) == 1
        with pytest.raises(openai.RateLimitError):
            sdk(gw, cred).chat.completions.create(model="tiny", messages=MSG)  # type: ignore[arg-type]
        for s in streams:
            assert s.finish()[-1] == "[DONE]"
    finally:
        for s in streams:
            s.close()
    # Both slots are free again at once, and the refused requests did not leak any.
    again = [OpenStream(gw, cred, slow) for _ in range(2)]
    try:
        assert [s.status for s in again] == [200, 200]
    finally:
        for s in again:
            s.close()


def test_concurrency_slot_freed_by_client_disconnect(gw: Gateway, who: str) -> None:
    cred = token(who, tier="conc2")
    long = body(max_tokens=1000, model="slow", stream=True)
    rid = f"{who}-gone"
    first = OpenStream(gw, cred, long, rid)
    second = OpenStream(gw, cred, long)
    try:
        assert [first.status, second.status] == [200, 200]
        assert post(gw, cred, body()).status_code == 429
        first.events(2)
        first.close()
        assert audit_line(gw, rid)["client_disconnected"] is True
        r = post(gw, cred, body())
        assert r.status_code == 200, r.text
    finally:
        first.close()
        second.close()


# ----------------------------------------------------------------------------- headers


def test_rate_limit_headers_on_every_success(gw: Gateway, who: str) -> None:
    limit_t = TIERS["both"]["tokens_per_minute"]
    cred = token(who, tier="both")
    seen_requests: list[int] = []
    resets: list[float] = []
    t0 = time.monotonic()

    r = post(gw, cred, body())  # plain chat
    seen_requests.append(assert_limit_headers(r, requests=10, tokens=limit_t)["requests"])
    resets.append(reset_seconds(r.headers["x-ratelimit-reset-requests"]))

    s = OpenStream(gw, cred, body(stream=True))  # streamed chat
    seen_requests.append(assert_limit_headers(s.response, requests=10, tokens=limit_t)["requests"])
    resets.append(reset_seconds(s.response.headers["x-ratelimit-reset-requests"]))
    s.finish()

    rc = httpx.post(  # the legacy completions endpoint
        gw.v1 + "/completions",
        json={"model": "tiny", "prompt": "one two", "max_tokens": 4},
        headers={"authorization": f"Bearer {cred}"},
        timeout=10,
    )
    assert rc.status_code == 200
    seen_requests.append(assert_limit_headers(rc, requests=10, tokens=limit_t)["requests"])

    raw = sdk(gw, cred).chat.completions.with_raw_response.create(
        model="tiny",
        messages=MSG,  # type: ignore[arg-type]
        max_tokens=4,
    )
    assert int(raw.headers["x-ratelimit-limit-requests"]) == 10
    seen_requests.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert raw.parse().choices[0].message.content

    assert seen_requests == [9, 8, 7, 6]
    # One fixed window from the first hit: the reset counts down, never restarts.
    elapsed = time.monotonic() - t0
    assert resets[0] >= resets[1] >= 60 - elapsed - 1.5
    tok_reset = reset_seconds(r.headers["x-ratelimit-reset-tokens"])
    assert abs(tok_reset - resets[0]) <= 1.5


# ----------------------------------------------------------------------------- two gateways


def test_two_gateways_share_one_global_rpm_limit(redis_gw: Gateway, redis_gw2: Gateway) -> None:
    """Needs Redis: RPM 50 for one principal, ~100 concurrent requests alternating across both."""
    cred = api_key("global")
    clients = [httpx.Client(timeout=10, limits=httpx.Limits(max_connections=32)) for _ in range(2)]
    gws = [redis_gw, redis_gw2]
    raw = body(max_tokens=2)

    def one(i: int) -> tuple[int, int]:
        g = i % 2
        r = clients[g].post(gws[g].v1 + "/chat/completions", content=raw, headers=headers_for(cred))
        return g, r.status_code

    try:
        with ThreadPoolExecutor(max_workers=24) as pool:
            results = list(pool.map(one, range(100)))
    finally:
        for c in clients:
            c.close()
    statuses = [s for _, s in results]
    accepted = statuses.count(200)
    per_gateway = [sum(1 for g, s in results if g == k and s == 200) for k in (0, 1)]
    print(f"\ntwo gateways, RPM 50: accepted {accepted} of 100 ({per_gateway[0]} + {per_gateway[1]})")
    # One Lua script takes the count or refuses atomically on Redis, whichever gateway asks:
    # exactly the limit gets through, the rest is refused.
    assert accepted == 50, accepted
    assert statuses.count(429) == 50, statuses
    assert all(n > 0 for n in per_gateway)
    assert redis_value(f"gw:rpm:p:{subject('global')}") == 50  # refusals were rolled back


def test_two_gateways_share_one_concurrency_cap(redis_gw: Gateway, redis_gw2: Gateway) -> None:
    """Needs Redis: max_concurrent 2 holds across processes."""
    cred = token(subject("two-gw-conc"), tier="conc2")
    slow = body(max_tokens=40, model="slow", stream=True)
    streams = [OpenStream(redis_gw, cred, slow), OpenStream(redis_gw2, cred, slow)]
    try:
        assert [s.status for s in streams] == [200, 200]
        for g in (redis_gw, redis_gw2):
            assert_openai_error(post(g, cred, body()), 429, "concurrency_limit_exceeded")
        for s in streams:
            s.finish()
    finally:
        for s in streams:
            s.close()
    assert post(redis_gw2, cred, body()).status_code == 200


# ----------------------------------------------------------------------------- storage failures


@pytest.fixture(scope="module", params=["open", "closed"])
def flaky(request: pytest.FixtureRequest, sims: tuple[Sim, Sim], config_dir: Path) -> Iterator[Any]:
    """A gateway whose Redis is a test-owned TCP proxy (to Redis db 9), fail-open or fail-closed."""
    proxy = RedisProxy()
    mode = request.param
    cfg = write_config(
        config_dir / f"flaky-{mode}.yaml", f"redis://127.0.0.1:{proxy.port}/{REDIS_DB}", on_error=mode
    )
    g = _start(sims, cfg)
    g.mode = mode  # type: ignore[attr-defined]
    g.proxy = proxy  # type: ignore[attr-defined]
    yield g
    g.stop()
    proxy.close()


def _timed(fn: Any, *args: Any) -> httpx.Response:
    t = time.monotonic()
    r: httpx.Response = fn(*args)
    took = time.monotonic() - t
    assert took < 2, f"a request took {took:.2f}s while the limit storage was failing"
    return r


def _assert_storage_failure_behaviour(g: Gateway, responses: list[httpx.Response]) -> None:
    if g.mode == "open":  # type: ignore[attr-defined]
        assert [r.status_code for r in responses] == [200] * len(responses), [r.text for r in responses]
        return
    for r in responses:
        err = assert_openai_error(r, 503, "rate_limit_storage_unavailable")
        assert err["type"] == "server_error"
        assert int(r.headers["retry-after"]) >= 1


def test_storage_unreachable_from_the_start(flaky: Gateway) -> None:
    """Nothing listens where Redis should be (like redis://127.0.0.1:1): open serves, closed 503s."""
    flaky.proxy.set("down")  # type: ignore[attr-defined]
    cred = token(subject(f"unreachable-{flaky.mode}"), tier="rpm3")  # type: ignore[attr-defined]
    before = storage_errors(flaky)
    seq = [_timed(post, flaky, cred, body()) for _ in range(5)]  # more than rpm3 allows
    with ThreadPoolExecutor(max_workers=8) as pool:
        par = list(pool.map(lambda _: _timed(post, flaky, cred, body()), range(8)))
    stream = _timed(post, flaky, cred, body(stream=True))
    _assert_storage_failure_behaviour(flaky, [*seq, *par, stream])
    if flaky.mode == "open":  # type: ignore[attr-defined]
        assert stream.text.rstrip().endswith("data: [DONE]")
    assert storage_errors(flaky) - before >= 14


def _wait_storage_back(g: Gateway, cred: str, expect: int) -> httpx.Response:
    """After the proxy is back, the next answers come from Redis again (allow a reconnect)."""
    deadline = time.monotonic() + 3
    while True:
        r = _timed(post, g, cred, body())
        if r.status_code == expect or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_redis_dies_mid_test(flaky: Gateway) -> None:
    """Needs Redis: limits hold; Redis dies (proxy cut) mid-stream; the mode decides; it recovers."""
    require_redis()
    mode = flaky.mode  # type: ignore[attr-defined]
    proxy: RedisProxy = flaky.proxy  # type: ignore[attr-defined]
    proxy.set("forward")
    cred = token(subject(f"mid-{mode}"), tier="rpm3")
    ok = [_wait_storage_back(flaky, cred, 200)] + [_timed(post, flaky, cred, body()) for _ in range(2)]
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert_openai_error(_timed(post, flaky, cred, body()), 429, "rate_limit_exceeded")

    in_flight = OpenStream(
        flaky, token(subject(f"mid-{mode}-stream"), tier="wide"), body(40, model="slow", stream=True)
    )
    assert in_flight.status == 200
    in_flight.events(3)
    before = storage_errors(flaky)
    proxy.set("down")  # Redis "dies": open connections are cut, new ones refused
    assert in_flight.finish()[-1] == "[DONE]"  # the stream in progress is not hurt

    during = [_timed(post, flaky, cred, body()) for _ in range(5)]
    _assert_storage_failure_behaviour(flaky, during)
    assert storage_errors(flaky) - before >= 5

    proxy.set("forward")  # Redis is back: the exhausted window is enforced again
    r = _wait_storage_back(flaky, cred, 429)
    assert_openai_error(r, 429, "rate_limit_exceeded")
    fresh = _wait_storage_back(flaky, token(subject(f"mid-{mode}-fresh"), tier="rpm3"), 200)
    assert fresh.status_code == 200
    assert_limit_headers(fresh, requests=3, tokens=None)


def test_redis_hangs(flaky: Gateway) -> None:
    """Redis accepts connections but never answers: storage_timeout (0.25 s) bounds every request."""
    proxy: RedisProxy = flaky.proxy  # type: ignore[attr-defined]
    proxy.set("blackhole")
    cred = token(subject(f"hang-{flaky.mode}"), tier="rpm3")  # type: ignore[attr-defined]
    before = storage_errors(flaky)
    responses = [_timed(post, flaky, cred, body()) for _ in range(5)]
    _assert_storage_failure_behaviour(flaky, responses)
    assert storage_errors(flaky) - before >= 5
    proxy.set("down")


def test_inflight_slots_released_after_redis_outage(flaky: Gateway) -> None:
    """Needs Redis: streams admitted before an outage and finished during it must not keep their
    in-flight slots once Redis is back (else the principal is locked out for ~11 minutes)."""
    require_redis()
    mode = flaky.mode  # type: ignore[attr-defined]
    proxy: RedisProxy = flaky.proxy  # type: ignore[attr-defined]
    proxy.set("forward")
    cred = token(subject(f"leak-{mode}"), tier="conc2")
    _wait_storage_back(flaky, token(subject(f"leak-{mode}-probe"), tier="wide"), 200)
    rids = [subject(f"leak-{mode}-{i}") for i in range(2)]
    streams = [OpenStream(flaky, cred, body(30, model="slow", stream=True), rid) for rid in rids]
    assert [s.status for s in streams] == [200, 200]
    proxy.set("down")
    for s in streams:
        assert s.finish()[-1] == "[DONE]"
    for rid in rids:
        audit_line(flaky, rid)  # both settled (and their release failed) while Redis was down
    proxy.set("forward")
    r = _wait_storage_back(flaky, cred, 200)
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------- cost


def test_report_limit_overhead(
    mem_gw: Gateway,
    nolimit_gw: Gateway,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not an assertion: the mean latency limits add to a plain request (printed; redis if reachable)."""
    gws: dict[str, Gateway] = {"no limits": nolimit_gw, "memory://": mem_gw}
    if redis_reachable():
        gws["redis://"] = request.getfixturevalue("redis_gw")
    cred = token(subject("bench"), tier="bench")
    raw = body(max_tokens=4)
    clients = {name: httpx.Client(timeout=10) for name in gws}
    times: dict[str, list[float]] = {name: [] for name in gws}
    names = list(gws)
    try:
        for i in range(220):
            for k in range(len(names)):  # rotate the order: no gateway is always first
                name = names[(i + k) % len(names)]
                g = gws[name]
                t = time.perf_counter()
                r = clients[name].post(g.v1 + "/chat/completions", content=raw, headers=headers_for(cred))
                took = time.perf_counter() - t
                assert r.status_code == 200
                if i >= 20:  # warm-up
                    times[name].append(took)
    finally:
        for c in clients.values():
            c.close()
    base = statistics.mean(times["no limits"])
    with capsys.disabled():
        print("\nlimit overhead, 200 sequential plain requests each (after 20 warm-up), interleaved:")
        for name, ts in times.items():
            mean = statistics.mean(ts)
            print(
                f"  {name:10s} total {sum(ts):6.3f} s  mean {mean * 1000:6.3f} ms"
                f"  median {statistics.median(ts) * 1000:6.3f} ms"
                f"  added {1000 * (mean - base):+6.3f} ms/request"
            )
