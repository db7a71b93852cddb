"""Breakers tell the truth and never black out a pool.

One replica, five 503s: its breaker opens, but with every replica of the pool ejected the
gateway routes to them anyway (Envoy's panic threshold), so clients get the backend's own
answer and the pool serves again at the first success, not after the reset time. Retry-After
is the real time until a request may succeed; every breaker transition is logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import orjson

from tests.procs import Gateway, Sim

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "breaker"}], "max_tokens": 2}


def until(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def _backend(gw: Gateway, sim: Sim) -> dict[str, object]:
    backends = httpx.get(gw.url + "/health", timeout=5).json()["backends"]
    return next(b for b in backends if b["url"] == sim.url)  # type: ignore[no-any-return]


def _post(gw: Gateway, stream: bool = False) -> httpx.Response:
    return httpx.post(gw.v1 + "/chat/completions", json={**BODY, "stream": stream}, timeout=30)


def test_a_single_replica_pool_is_not_dark_after_its_breaker_opens() -> None:
    sim = Sim(None)
    gw = Gateway(
        [sim.url],
        env={"GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "5", "GATEWAY_RESILIENCE__BREAKER_RESET_SECONDS": "30"},
    )
    try:
        sim.control(fault="status:503")
        for _ in range(5):
            assert _post(gw).status_code == 503
        assert _backend(gw, sim)["breaker"] == "open"
        # Still failing: the client gets the backend's own answer, not a made-up outage.
        r = _post(gw)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "upstream_unavailable"
        assert "Simulated engine failure" in r.json()["error"]["message"]
        sim.control(fault="")
        # Recovered: served at once (both kinds of request), not after the 30 s reset time.
        assert _post(gw).status_code == 200
        assert _backend(gw, sim)["breaker"] == "closed"
        assert _post(gw, stream=True).status_code == 200
    finally:
        gw.stop()
        sim.stop()


def test_retry_after_is_the_time_until_a_down_replica_can_be_readmitted() -> None:
    sim = Sim(None)
    gw = Gateway([sim.url], env={"GATEWAY_HEALTH__INTERVAL": "3", "GATEWAY_RESILIENCE__READMIT_AFTER": "2"})
    try:
        sim.control(healthy=False)
        until(lambda: _backend(gw, sim)["state"] == "down", what="replica down")
        r = _post(gw)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_backend_available"
        assert r.headers["retry-after"] == "6"  # two good checks, 3 s apart
    finally:
        gw.stop()
        sim.stop()


def test_every_breaker_transition_is_logged_with_its_cause() -> None:
    sim = Sim(None)
    gw = Gateway(
        [sim.url],
        env={"GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "2", "GATEWAY_RESILIENCE__BREAKER_RESET_SECONDS": "30"},
    )
    try:
        sim.control(fault="status:503")
        for _ in range(2):
            assert _post(gw).status_code == 503
        sim.control(fault="")
        assert _post(gw).status_code == 200

        def changes() -> list[dict[str, object]]:
            lines = [orjson.loads(x) for x in gw.log_lines() if x.startswith("{")]
            return [x for x in lines if x.get("event") == "circuit breaker state changed"]

        until(lambda: len(changes()) == 2, what="two transitions logged")
        found = changes()
        assert [(c["from"], c["to"]) for c in found] == [("closed", "open"), ("open", "closed")]
        assert {c["level"] for c in found} == {"warning"}
        assert {c["backend"] for c in found} == {sim.url.split("://", 1)[1]}
        assert "upstream_unavailable" in str(found[0]["cause"])
        assert "panic" in str(found[1]["cause"])
    finally:
        gw.stop()
        sim.stop()
