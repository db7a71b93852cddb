"""Admission and routing through real processes: a gateway in front of several simulator replicas.

Every test talks to a real gateway process (a YAML config in a temporary directory) in front of real
simulator processes over real sockets. A further simulator, started with ``--model ext-model``,
plays the external OpenAI-compatible provider; what it received is read from its ``/sim/stats``.

Covered: bursts far above the pool's capacity (queued, never over a replica's ``max_in_flight``),
tier priorities and team turns in the admission queue, queue deadlines and a full queue, cold
start, the external fallback and strict data residency, task-type routes, aliases (also in
``/v1/models``), session affinity and load-aware replica choice. The last test prints (does not
assert) what routing costs per request.

Timing used throughout: the pool simulators answer a plain request after ``ttft + itl *
(tokens - 1)`` seconds, so ``max_tokens`` sets how long a request holds its slot.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.procs import Gateway, Sim, free_port, until

UID = secrets.token_hex(4)
MSG = [{"role": "user", "content": "route me"}]

# API keys (only their sha256 goes into the config): name -> (key, team, tier)
KEYS: dict[str, tuple[str, str | None, str | None]] = {
    "saturate": (f"sk-{UID}-saturate", "sat", "batch"),
    "batch": (f"sk-{UID}-batch", "alpha", "batch"),
    "interactive": (f"sk-{UID}-interactive", "alpha", "interactive"),
    "flood": (f"sk-{UID}-flood", "flood", "batch"),
    "calm": (f"sk-{UID}-calm", "calm", "batch"),
    "open": (f"sk-{UID}-open", "open", None),
    "strict": (f"sk-{UID}-strict", "vault", None),
    "teamless": (f"sk-{UID}-teamless", None, None),
}
TIERS = {"interactive": {"priority": 0}, "batch": {"priority": 10}}


# ----------------------------------------------------------------------------- helpers


def write_config(path: Path, cfg: dict[str, Any], *, keys: bool = False) -> Path:
    if keys:
        cfg = {
            **cfg,
            "auth": {
                "api_keys": [
                    {
                        "sha256": hashlib.sha256(key.encode()).hexdigest(),
                        "subject": f"{UID}-{name}",
                        **({"team": team} if team else {}),
                        **({"tier": tier} if tier else {}),
                    }
                    for name, (key, team, tier) in KEYS.items()
                ]
            },
        }
    path.write_text(yaml.safe_dump(cfg))
    return path


def chat(model: str = "tiny", *, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    """A chat request body."""
    return {"model": model, "messages": MSG, "max_tokens": max_tokens, **extra}


def post(
    gw: Gateway,
    body: dict[str, Any],
    key: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> httpx.Response:
    h = dict(headers or {})
    if key is not None:
        h["authorization"] = f"Bearer {KEYS[key][0]}"
    return httpx.post(gw.v1 + "/chat/completions", json=body, headers=h, timeout=timeout)


def timed(fn: Callable[[], httpx.Response]) -> Callable[[], tuple[httpx.Response, float]]:
    """Wrap a request so that it also returns its completion time (perf_counter)."""

    def run() -> tuple[httpx.Response, float]:
        r = fn()
        return r, time.perf_counter()

    return run


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def scrape(gw: Gateway) -> str:
    return httpx.get(gw.url + "/metrics", timeout=5).text


def queue_depth(gw: Gateway, **labels: str) -> float:
    return metric(scrape(gw), "gateway_queue_depth", **labels)


def health(gw: Gateway) -> dict[str, dict[str, Any]]:
    return {b["url"]: b for b in httpx.get(gw.url + "/health", timeout=5).json()["backends"]}


def model_ids(gw: Gateway, key: str | None = None) -> dict[str, dict[str, Any]]:
    h = {"authorization": f"Bearer {KEYS[key][0]}"} if key else {}
    return {c["id"]: c for c in httpx.get(gw.v1 + "/models", headers=h, timeout=5).json()["data"]}


def label(sim: Sim) -> str:
    """The gateway's default backend label: host:port."""
    return sim.url.split("://", 1)[1]


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code, err
    return err


def retry_after(r: httpx.Response) -> int:
    assert "retry-after" in r.headers, dict(r.headers)
    value = int(r.headers["retry-after"])
    assert value >= 1
    return value


def sim_requests(sim: Sim, rid_prefix: str) -> list[dict[str, Any]]:
    """Requests the simulator recorded whose X-Request-Id starts with ``rid_prefix``."""
    return [r for r in sim.stats()["requests"] if (r["x_request_id"] or "").startswith(rid_prefix)]


# ----------------------------------------------------------------------------- the pool: capacity 4
#
# Two replicas with max_in_flight 2 each (and vLLM's --max-num-seqs 2, so anything the gateway sent
# beyond 2 would show as "waiting" in the simulator). A request with max_tokens N holds its slot for
# 0.05 + 0.05 * (N - 1) seconds.

POOL_CAPACITY = 4
SATURATE_TOKENS = 50  # ~2.5 s: long enough to queue everything else behind it


@pytest.fixture(scope="module")
def pool_sims() -> Iterator[list[Sim]]:
    flags = ("--ttft", "0.05", "--itl", "0.05", "--output-tokens", "64", "--max-num-seqs", "2")
    sims = [Sim(None, *flags) for _ in range(2)]
    yield sims
    for s in sims:
        s.stop()


@pytest.fixture(scope="module")
def pool_gw(pool_sims: list[Sim], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    cfg = {
        "backends": [{"url": s.url, "max_in_flight": 2} for s in pool_sims],
        "admission": {"queue_timeout": 30},
        "tiers": TIERS,
    }
    path = write_config(tmp_path_factory.mktemp("pool") / "pool.yaml", cfg, keys=True)
    g = Gateway([], config=path)
    yield g
    g.stop()


def _saturate(pool: ThreadPoolExecutor, gw: Gateway) -> list[Future[tuple[httpx.Response, float]]]:
    """Fill the pool's 4 slots with long requests and wait until the gateway counts them."""
    futures = [
        pool.submit(timed(lambda: post(gw, chat(max_tokens=SATURATE_TOKENS), "saturate")))
        for _ in range(POOL_CAPACITY)
    ]
    until(
        lambda: metric(scrape(gw), "gateway_pool_in_flight", model="tiny") == POOL_CAPACITY,
        what="the pool to be full",
    )
    return futures


def test_burst_of_10x_capacity_is_queued_never_over_max_in_flight(
    pool_gw: Gateway, pool_sims: list[Sim]
) -> None:
    before = scrape(pool_gw)
    n = 10 * POOL_CAPACITY
    max_running = {s.url: 0 for s in pool_sims}
    max_waiting = {s.url: 0 for s in pool_sims}
    max_depth = 0.0
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(post, pool_gw, chat(max_tokens=4), "batch") for _ in range(n)]
        while not all(f.done() for f in futures):
            for s in pool_sims:
                st = s.stats()
                max_running[s.url] = max(max_running[s.url], st["running"])
                max_waiting[s.url] = max(max_waiting[s.url], st["waiting"])
            max_depth = max(max_depth, queue_depth(pool_gw, model="tiny"))
            time.sleep(0.01)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * n, [
        r.text for r in responses if r.status_code != 200
    ]
    # No replica ever got more than its max_in_flight: vLLM never had to queue anything itself...
    assert max_waiting == dict.fromkeys(max_waiting, 0), max_waiting
    assert all(v <= 2 for v in max_running.values()), max_running
    # ...while both replicas were used to capacity and the excess waited in the gateway.
    assert all(v == 2 for v in max_running.values()), max_running
    assert max_depth > 0
    after = scrape(pool_gw)
    count = metric(after, "gateway_queue_wait_seconds_count", model="tiny") - metric(
        before, "gateway_queue_wait_seconds_count", model="tiny"
    )
    waited = metric(after, "gateway_queue_wait_seconds_sum", model="tiny") - metric(
        before, "gateway_queue_wait_seconds_sum", model="tiny"
    )
    slow = metric(after, "gateway_queue_wait_seconds_count", model="tiny") - metric(
        after, "gateway_queue_wait_seconds_bucket", model="tiny", le="0.1"
    )
    assert count == n
    assert waited > 5  # 36 of them waited for 1 to 9 rounds of ~0.2 s
    assert slow >= n // 2
    assert queue_depth(pool_gw, model="tiny") == 0


def test_interactive_tier_overtakes_batch_queued_with_it(pool_gw: Gateway) -> None:
    with ThreadPoolExecutor(16) as pool:
        saturators = _saturate(pool, pool_gw)
        batch = [pool.submit(timed(lambda: post(pool_gw, chat(max_tokens=3), "batch"))) for _ in range(6)]
        until(lambda: queue_depth(pool_gw, model="tiny", priority="10") == 6, what="6 batch queued")
        interactive = [
            pool.submit(timed(lambda: post(pool_gw, chat(max_tokens=3), "interactive"))) for _ in range(4)
        ]
        until(lambda: queue_depth(pool_gw, model="tiny", priority="0") == 4, what="4 interactive queued")
        assert not any(f.done() for f in saturators)  # everything was queued at the same moment
        done_batch = [f.result() for f in batch]
        done_interactive = [f.result() for f in interactive]
        for f in saturators:
            assert f.result()[0].status_code == 200
    assert all(r.status_code == 200 for r, _ in done_batch + done_interactive)
    last_interactive = max(t for _, t in done_interactive)
    first_batch = min(t for _, t in done_batch)
    assert last_interactive < first_batch, (
        f"an interactive request finished {last_interactive - first_batch:.3f}s after the first batch one"
    )


def test_teams_take_turns_within_a_priority(pool_gw: Gateway) -> None:
    with ThreadPoolExecutor(32) as pool:
        saturators = _saturate(pool, pool_gw)
        flood = [pool.submit(timed(lambda: post(pool_gw, chat(max_tokens=4), "flood"))) for _ in range(20)]
        until(lambda: queue_depth(pool_gw, model="tiny") == 20, what="the flood to be queued")
        calm = [pool.submit(timed(lambda: post(pool_gw, chat(max_tokens=4), "calm"))) for _ in range(2)]
        until(lambda: queue_depth(pool_gw, model="tiny") == 22, what="the calm team's requests queued")
        assert not any(f.done() for f in saturators)
        done_flood = sorted(t for r, t in (f.result() for f in flood) if r.status_code == 200)
        done_calm = [f.result() for f in calm]
        for f in saturators:
            assert f.result()[0].status_code == 200
    assert len(done_flood) == 20
    assert all(r.status_code == 200 for r, _ in done_calm)
    last_calm = max(t for _, t in done_calm)
    # Turns: flood, calm, flood, calm, ... so both are in the first round after the saturators
    # (first come, first served would put them behind all 20).
    flood_before = sum(t < last_calm for t in done_flood)
    assert flood_before <= POOL_CAPACITY, f"{flood_before} of the flood finished before the calm team"
    assert done_flood[-1] - last_calm > 0.5  # long before the flood drained


# ----------------------------------------------------------------------------- deadlines


def test_full_queue_429_and_queue_timeout_503_with_retry_after(tmp_path: Path) -> None:
    sim = Sim(None, "--ttft", "0.05", "--itl", "0.05", "--output-tokens", "64")
    cfg = {
        "backends": [{"url": sim.url, "max_in_flight": 1}],
        "admission": {"queue_timeout": 0.5, "max_queue": 3},
    }
    gw = Gateway([], config=write_config(tmp_path / "deadlines.yaml", cfg))
    try:
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(post, gw, chat(max_tokens=40))  # ~2 s: holds the only slot
            until(lambda: metric(scrape(gw), "gateway_pool_in_flight", model="tiny") == 1, what="busy")
            started = time.perf_counter()
            rest = [pool.submit(timed(lambda: post(gw, chat(max_tokens=1)))) for _ in range(7)]
            results = [f.result() for f in rest]
            assert first.result().status_code == 200
        by_status: dict[int, list[tuple[httpx.Response, float]]] = {}
        for r, t in results:
            by_status.setdefault(r.status_code, []).append((r, t))
        assert sorted(by_status) == [429, 503], {s: [r.text for r, _ in v] for s, v in by_status.items()}
        assert len(by_status[503]) == 3  # max_queue waited, then gave up
        assert len(by_status[429]) == 4  # the rest found the queue full
        for r, _ in by_status[429]:
            err = assert_openai_error(r, 429, "queue_full")
            assert err["type"] == "rate_limit_error"
            retry_after(r)
        for r, t in by_status[503]:
            assert_openai_error(r, 503, "queue_timeout")
            retry_after(r)
            assert t - started > 0.45  # they waited queue_timeout (0.5 s; `started` is a little late)
        # Refused at once, not after waiting: every 429 came before any queue timeout.
        assert max(t for _, t in by_status[429]) < min(t for _, t in by_status[503])
        assert sim.stats()["received"] == 1  # nothing shed reached the replica
    finally:
        gw.stop()
        sim.stop()


# ----------------------------------------------------------------------------- cold start


@pytest.mark.parametrize("replica", ["loading", "not started yet"])
def test_requests_during_cold_start_wait_and_complete(tmp_path: Path, replica: str) -> None:
    """Deploy / scale from zero: the gateway is up first, its only replica is not ready yet."""
    port = free_port()
    flags = ("--ttft", "0.01", "--itl", "0.001")
    cold_start_wait = 15.0
    cfg = {
        "backends": [{"url": f"http://127.0.0.1:{port}"}],
        "admission": {"cold_start_wait": cold_start_wait},
    }
    gw = Gateway([], config=write_config(tmp_path / "cold.yaml", cfg), wait_ready=False)
    sim: Sim | None = None
    try:
        if replica == "loading":
            sim = Sim(port, "--load-time", "3", *flags)  # the vLLM process is up, loading its weights
        assert httpx.get(gw.url + "/ready").status_code == 503
        sent = time.perf_counter()
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(timed(lambda: post(gw, chat(max_tokens=2)))) for _ in range(6)]
            until(lambda: queue_depth(gw, model="tiny") == 6, what="6 requests waiting for the cold start")
            if sim is None:
                time.sleep(0.5)
                sim = Sim(port, "--load-time", "1", *flags)  # the vLLM process starts only now
            assert httpx.get(sim.url + "/health").status_code == 503  # still loading
            results = [f.result() for f in futures]
        assert [r.status_code for r, _ in results] == [200] * 6, [r.text for r, _ in results]
        assert all(t - sent < cold_start_wait for _, t in results)
        assert min(t for _, t in results) - sent > 0.5  # they really waited for the load
        assert sim.stats()["completed"] == 6
        assert httpx.get(gw.url + "/ready").status_code == 200
    finally:
        gw.stop()
        if sim is not None:
            sim.stop()


def test_cold_start_of_one_model_while_another_model_is_served(tmp_path: Path) -> None:
    """A second model's replica is (re)deployed behind a gateway that already serves the first.

    The backend declares its model (`backends[].models`), so the gateway knows `big` is coming:
    requests for it should wait for the load like any cold start, not fail.
    """
    small = Sim(None, "--model", "small")
    big_port = free_port()
    cfg = {
        "backends": [
            {"url": small.url, "models": ["small"]},
            {"url": f"http://127.0.0.1:{big_port}", "models": ["big"]},
        ],
        "admission": {"cold_start_wait": 15},
    }
    gw = Gateway([], config=write_config(tmp_path / "cold2.yaml", cfg))  # ready: `small` is
    big = Sim(big_port, "--model", "big", "--load-time", "3")
    try:
        assert httpx.get(big.url + "/health").status_code == 503  # `big` still loading
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: post(gw, chat("big", max_tokens=2)), range(3)))
        assert [r.status_code for r in results] == [200] * 3, [r.text for r in results]
        assert big.stats()["completed"] == 3
    finally:
        gw.stop()
        small.stop()
        big.stop()


# ----------------------------------------------------------------------------- external fallback


def test_all_replicas_down_fallback_only_where_allowed(tmp_path: Path) -> None:
    a, b = Sim(None), Sim(None)
    ext = Sim(None, "--model", "ext-model")
    cfg = {
        "backends": [{"url": a.url}, {"url": b.url}],
        "routing": {"default_route": {"fallback": True}, "routes": {"pinned": {}}},
        "external": {"base_url": ext.url + "/v1", "models": {"tiny": "ext-model"}},
        "teams": {"open": {}, "vault": {"data_residency": "strict"}},
    }
    gw = Gateway([], config=write_config(tmp_path / "fallback.yaml", cfg, keys=True))
    fallen_back = 0

    def served_externally(body: dict[str, Any], reasons: tuple[str, ...]) -> dict[str, Any]:
        """One request of the `open` team: served by the provider; what the provider received."""
        nonlocal fallen_back
        before = ext.stats()["received"]
        rid = f"{UID}-fb-{secrets.token_hex(3)}"
        r = post(gw, body, "open", headers={"x-request-id": rid})
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-fallback"] in reasons
        assert r.headers["x-gateway-backend"] == "external"
        assert r.json()["choices"][0]["message"]["content"]
        assert ext.stats()["received"] == before + 1
        fallen_back += 1
        (sent,) = sim_requests(ext, rid)
        assert sent["body"]["model"] == "ext-model"
        assert sent["authorization"] is None  # the client's key never leaves
        return dict(sent["body"])

    def refused_locally(key: str, **headers: str) -> None:
        before = ext.stats()["received"]
        for _ in range(3):
            r = post(gw, chat(), key, headers=headers)
            assert r.status_code == 503, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.json()["error"]["code"] in ("no_backend_available", "upstream_unavailable")
            retry_after(r)
            assert r.headers["x-gateway-fallback"] == "false"
        assert ext.stats()["received"] == before, f"{key}: the request left the premises"

    try:
        r = post(gw, chat(), "open")
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-fallback"] == "false"
        assert r.headers["x-gateway-backend"] in (label(a), label(b))
        assert ext.stats()["received"] == 0

        a.proc.kill()
        b.proc.kill()
        # At once: connections refused, retried on the other replica, refused again (the health
        # poller may not have noticed yet)...
        served_externally(chat(), ("upstream_unavailable", "no_backend_available"))
        refused_locally("strict")
        refused_locally("teamless")
        # ...and once the poller has marked both replicas down.
        until(lambda: httpx.get(gw.url + "/ready").status_code == 503, what="all replicas down")
        refused_locally("strict")
        refused_locally("teamless")
        refused_locally("open", **{"x-task-type": "pinned"})  # a route without fallback stays local
        sent = served_externally(chat(task_type="anything"), ("no_backend_available",))
        assert "task_type" not in sent

        with httpx.stream(
            "POST",
            gw.v1 + "/chat/completions",
            json=chat(stream=True),
            headers={"authorization": f"Bearer {KEYS['open'][0]}"},
            timeout=30,
        ) as s:
            assert s.status_code == 200
            assert s.headers["x-gateway-backend"] == "external"
            assert s.headers["x-gateway-fallback"] == "no_backend_available"
            streamed = b"".join(s.iter_raw())
        fallen_back += 1
        assert streamed.endswith(b"data: [DONE]\n\n")
        assert b'"error"' not in streamed

        refused_locally("strict")  # still never, after others fell back
        assert ext.stats()["received"] == fallen_back
        assert metric(scrape(gw), "gateway_fallbacks_total") == fallen_back
    finally:
        gw.stop()
        for s in (a, b, ext):
            s.stop()


# ----------------------------------------------------------------------------- routes and aliases


@pytest.fixture(scope="module")
def route_sims() -> Iterator[tuple[Sim, Sim]]:
    small = Sim(None, "--model", "small", "--ttft", "0.01", "--itl", "0.001")
    big = Sim(None, "--model", "big", "--ttft", "0.01", "--itl", "0.001")
    yield small, big
    small.stop()
    big.stop()


@pytest.fixture(scope="module")
def route_gw(route_sims: tuple[Sim, Sim], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    small, big = route_sims
    cfg = {
        "backends": [{"url": small.url}, {"url": big.url}],
        "routing": {
            "routes": {
                "classification": {"model": "small"},
                "generation": {"model": "big", "fallback": True},
            },
            "aliases": {"fast": "small", "quick": "fast"},  # quick: an alias of an alias
        },
    }
    g = Gateway([], config=write_config(tmp_path_factory.mktemp("routes") / "routes.yaml", cfg))
    yield g
    g.stop()


def _routed(gw: Gateway, sims: tuple[Sim, Sim], body: dict[str, Any], **headers: str) -> tuple[str, Any]:
    """(route header, (which sim, the body it received)) for one request."""
    rid = f"{UID}-{secrets.token_hex(4)}"
    r = post(gw, body, headers={"x-request-id": rid, **headers})
    assert r.status_code == 200, r.text
    hits = [(s, req) for s in sims for req in sim_requests(s, rid)]
    assert len(hits) == 1, hits
    return r.headers["x-gateway-route"], hits[0]


def test_task_type_header_routes_to_the_route_model(route_gw: Gateway, route_sims: tuple[Sim, Sim]) -> None:
    small, _ = route_sims
    route, (sim, sent) = _routed(route_gw, route_sims, chat("big"), **{"X-Task-Type": "classification"})
    assert route == "classification"
    assert sim is small
    assert sent["body"]["model"] == "small"


def test_task_type_body_field_routes_and_is_removed(route_gw: Gateway, route_sims: tuple[Sim, Sim]) -> None:
    small, _ = route_sims
    body = chat("big", task_type="classification", top_k=5, temperature=0.5)
    route, (sim, sent) = _routed(route_gw, route_sims, body)
    assert route == "classification"
    assert sim is small
    assert "task_type" not in sent["body"]
    assert sent["body"] == {**chat("small"), "top_k": 5, "temperature": 0.5}


def test_other_routes_and_unknown_task_types(route_gw: Gateway, route_sims: tuple[Sim, Sim]) -> None:
    small, big = route_sims
    route, (sim, sent) = _routed(route_gw, route_sims, chat("small"), **{"X-Task-Type": "generation"})
    assert (route, sim, sent["body"]["model"]) == ("generation", big, "big")
    # Unknown or no task type: the default route, the model the client asked for.
    route, (sim, sent) = _routed(route_gw, route_sims, chat("big"), **{"X-Task-Type": "poetry"})
    assert (route, sim, sent["body"]["model"]) == ("default", big, "big")
    route, (sim, sent) = _routed(route_gw, route_sims, chat("big", task_type="poetry"))
    assert (route, sim, sent["body"]["model"]) == ("default", big, "big")
    assert "task_type" not in sent["body"]
    route, (sim, _) = _routed(route_gw, route_sims, chat("small"))
    assert (route, sim) == ("default", small)


def test_alias_is_served_and_listed(route_gw: Gateway, route_sims: tuple[Sim, Sim]) -> None:
    small, _ = route_sims
    route, (sim, sent) = _routed(route_gw, route_sims, chat("fast"))
    assert (route, sim, sent["body"]["model"]) == ("default", small, "small")
    cards = model_ids(route_gw)
    assert set(cards) == {"small", "big", "fast", "quick"}
    assert cards["fast"]["owned_by"] == "gateway"
    assert cards["fast"]["root"] == "small"
    assert httpx.get(route_gw.v1 + "/models/fast").json()["id"] == "fast"
    # A chain resolves to its end (was: 404 naming `fast`, a model the client never asked for).
    route, (sim, sent) = _routed(route_gw, route_sims, chat("quick"))
    assert (route, sim, sent["body"]["model"]) == ("default", small, "small")
    assert cards["quick"]["root"] == "small"


def test_models_of_unhealthy_replicas_and_their_aliases_are_hidden(tmp_path: Path) -> None:
    small_a = Sim(None, "--model", "small")
    small_b = Sim(None, "--model", "small")
    big = Sim(None, "--model", "big")
    cfg = {
        "backends": [{"url": s.url} for s in (small_a, small_b, big)],
        "routing": {"aliases": {"fast": "small"}},
        "resilience": {"readmit_after": 2},
    }
    gw = Gateway([], config=write_config(tmp_path / "hide.yaml", cfg))
    try:
        assert set(model_ids(gw)) == {"small", "big", "fast"}
        small_a.proc.kill()
        until(lambda: health(gw)[small_a.url]["state"] == "down", what="small_a down")
        assert set(model_ids(gw)) == {"small", "big", "fast"}  # one replica of `small` is left
        assert post(gw, chat("fast")).status_code == 200
        small_b.control(healthy=False)
        until(lambda: "small" not in model_ids(gw), what="`small` hidden")
        assert set(model_ids(gw)) == {"big"}  # the alias went with its target
        assert httpx.get(gw.v1 + "/models/fast").status_code == 404
        r = post(gw, chat("fast"))
        assert_openai_error(r, 503, "no_backend_available")  # known but down: retry, not 404
        retry_after(r)
        small_b.control(healthy=True)
        until(lambda: "fast" in model_ids(gw), what="the alias back with its replica")
        assert set(model_ids(gw)) == {"small", "big", "fast"}
        assert post(gw, chat("fast")).status_code == 200
        small_b.proc.kill()  # the last replica of `small` dies
        until(lambda: "small" not in model_ids(gw), what="`small` hidden again")
        assert set(model_ids(gw)) == {"big"}
    finally:
        gw.stop()
        for s in (small_a, small_b, big):
            s.stop()


# ----------------------------------------------------------------------------- affinity and load


@pytest.fixture(scope="module")
def lb_sims() -> Iterator[tuple[Sim, Sim]]:
    flags = ("--ttft", "0.01", "--itl", "0.001", "--max-num-seqs", "1")
    a, b = Sim(None, *flags), Sim(None, *flags)
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def lb_gw(lb_sims: tuple[Sim, Sim]) -> Iterator[Gateway]:
    g = Gateway([s.url for s in lb_sims])
    yield g
    g.stop()


def _backends(gw: Gateway, bodies: list[dict[str, Any]], headers: list[dict[str, str]]) -> list[str]:
    out = []
    for body, h in zip(bodies, headers, strict=True):
        r = post(gw, body, headers=h)
        assert r.status_code == 200, r.text
        out.append(r.headers["x-gateway-backend"])
    return out


def test_session_affinity_keeps_a_session_on_one_replica(lb_gw: Gateway, lb_sims: tuple[Sim, Sim]) -> None:
    a, b = lb_sims
    tag = f"{UID}-aff-{secrets.token_hex(3)}"
    for session in ("s-1", "s-2", "s-3"):
        hdrs = [{"x-session-id": session, "x-request-id": f"{tag}-{session}-{i}"} for i in range(10)]
        seen = _backends(lb_gw, [chat(max_tokens=1)] * 10, hdrs)
        assert len(set(seen)) == 1, (session, seen)
        # The replicas agree: all 10 really reached the one the header names.
        on_a, on_b = (len(sim_requests(s, f"{tag}-{session}-")) for s in (a, b))
        assert sorted((on_a, on_b)) == [0, 10]
        assert seen[0] == label(a if on_a else b)
    for user in ("alice", "bob"):
        seen = _backends(lb_gw, [chat(max_tokens=1, user=user)] * 10, [{}] * 10)
        assert len(set(seen)) == 1, (user, seen)
    # Different sessions spread over both replicas.
    seen = _backends(lb_gw, [chat(max_tokens=1)] * 24, [{"x-session-id": f"{tag}-{i}"} for i in range(24)])
    counts = {x: seen.count(x) for x in set(seen)}
    assert set(counts) == {label(a), label(b)}
    assert min(counts.values()) >= 3, counts


def test_load_aware_choice_avoids_the_replica_with_a_queue(lb_gw: Gateway, lb_sims: tuple[Sim, Sim]) -> None:
    """Other clients keep replica `a` busy behind the gateway's back: only vLLM's metrics show it.

    The gateway's own outstanding counts are 0 on both replicas for every sequential request, so
    without the scraped load every choice is a tie (round-robin: half to `a`). With it, `a` weighs
    outstanding 0 + waiting 3 + 4 * KV usage 1 = 7 against at most 4 for `b`.
    """
    a, b = lb_sims
    received = a.stats()["received"]
    a.control(ttft=1.5)
    direct = ThreadPoolExecutor(4)
    try:
        for _ in range(4):  # 1 running, 3 waiting in a's engine (--max-num-seqs 1)
            direct.submit(httpx.post, a.url + "/v1/chat/completions", json=chat(max_tokens=1), timeout=30)
        until(lambda: a.stats()["waiting"] == 3, what="a queue on replica a")
        until(lambda: health(lb_gw)[a.url]["vllm"]["waiting"] == 3, what="the gateway to scrape it")
        seen = _backends(lb_gw, [chat(max_tokens=1)] * 20, [{}] * 20)
        assert seen.count(label(b)) == 20, {x: seen.count(x) for x in set(seen)}
        assert a.stats()["received"] == received + 4  # only the direct ones
    finally:
        a.control(ttft=0.01)
        direct.shutdown(wait=True)
    until(lambda: a.stats()["waiting"] == 0 and a.stats()["running"] == 0, what="a idle again")


# ----------------------------------------------------------------------------- cost (printed)


def _cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads, in ns resolution (/proc/PID/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return total / 1e9


def test_report_routing_cost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not an assertion: mean latency and gateway CPU per plain request, 1 replica vs 4 + routes."""
    sims = [Sim(None, "--ttft", "0", "--itl", "0") for _ in range(4)]
    env = {"GATEWAY_HEALTH__INTERVAL": "5", "GATEWAY_LOGGING__ACCESS_LOG": "false"}
    cfg = {
        "backends": [{"url": s.url} for s in sims],
        "routing": {
            "routes": {"chat": {"model": "fast"}, "classification": {"model": "tiny"}},
            "aliases": {"fast": "tiny", "default": "tiny"},
        },
    }
    gws = {
        "1 replica": Gateway([sims[0].url], env=env),
        "4 replicas + routes": Gateway([], env=env, config=write_config(tmp_path / "cost.yaml", cfg)),
    }
    # Same bytes to both; the routed gateway resolves the task route and the alias, hashes the
    # session over 4 replicas and weighs their load; the other one has nothing to route.
    raw = httpx.Request("POST", "http://x", json=chat(max_tokens=4)).content
    hdrs = {"content-type": "application/json", "x-task-type": "chat", "x-session-id": "bench"}
    names = list(gws)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, float] = {}
    clients = {n: httpx.Client(timeout=10) for n in names}
    try:
        warm, runs = 20, 300
        for i in range(warm + runs):
            if i == warm:
                cpu = {n: _cpu_seconds(gws[n].proc.pid) for n in names}
            for k in range(len(names)):  # alternate which gateway goes first
                n = names[(i + k) % len(names)]
                t = time.perf_counter()
                r = clients[n].post(gws[n].v1 + "/chat/completions", content=raw, headers=hdrs)
                took = time.perf_counter() - t
                assert r.status_code == 200, r.text
                if i >= warm:
                    times[n].append(took)
        cpu = {n: _cpu_seconds(gws[n].proc.pid) - cpu[n] for n in names}
    finally:
        for c in clients.values():
            c.close()
        for g in gws.values():
            g.stop()
        for s in sims:
            s.stop()
    base = statistics.mean(times[names[0]])
    with capsys.disabled():
        print(f"\nrouting cost, {runs} sequential plain requests each (after {warm} warm-up), interleaved:")
        for n in names:
            ts = times[n]
            mean = statistics.mean(ts)
            print(
                f"  {n:20s} mean {mean * 1000:6.3f} ms  median {statistics.median(ts) * 1000:6.3f} ms"
                f"  added {1000 * (mean - base):+6.3f} ms/request"
                f"  gateway CPU {cpu[n] / runs * 1000:6.3f} ms/request"
            )
