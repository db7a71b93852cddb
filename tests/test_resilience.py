"""Replica failures: retries before the first byte, circuit breakers, re-admission."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from tests.procs import Gateway, Sim

MSG = [{"role": "user", "content": "resilient"}]


def _health(gw: Gateway) -> dict[str, dict[str, object]]:
    return {b["url"]: b for b in httpx.get(gw.url + "/health").json()["backends"]}


def test_killed_replica_under_load_no_client_errors_then_readmitted() -> None:
    a, b = Sim(None), Sim(None)
    gw = Gateway(
        [a.url, b.url], env={"GATEWAY_HEALTH__INTERVAL": "0.5", "GATEWAY_RESILIENCE__READMIT_AFTER": "2"}
    )
    try:
        c = openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0, timeout=30)

        def one(i: int) -> str:
            if i % 2:
                parts = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, stream=True)  # type: ignore[arg-type]
                return "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
            r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4)  # type: ignore[arg-type]
            return r.choices[0].message.content or ""

        with ThreadPoolExecutor(8) as pool:
            before = [pool.submit(one, i) for i in range(20)]
            a.proc.kill()  # mid-load: requests in flight to it, more routed to it before health notices
            after = [pool.submit(one, i) for i in range(20, 80)]
            # Streams that a had already started cannot be retried (their first byte is out):
            # they end with an SSE error event. Nothing else may fail.
            cut = 0
            for f in before:
                try:
                    assert f.result() == " resilient resilient resilient resilient"
                except openai.APIError:
                    cut += 1
            assert cut <= 8
            results = [f.result() for f in after]  # raises if any client saw an error
        assert all(r == " resilient resilient resilient resilient" for r in results)
        # The health poller (every 0.2 s here) marks the killed replica down.
        deadline = time.monotonic() + 10
        while _health(gw)[a.url]["state"] != "down" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _health(gw)[a.url]["state"] == "down"
        served_by_b = b.stats()["completed"]
        assert served_by_b >= 60
        a2 = Sim(a.port)
        try:
            deadline = time.monotonic() + 20
            while _health(gw)[a.url]["state"] != "healthy" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _health(gw)[a.url]["state"] == "healthy"
            for _ in range(10):
                c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)  # type: ignore[arg-type]
            assert a2.stats()["completed"] > 0  # traffic came back to the re-admitted replica
        finally:
            a2.stop()
    finally:
        gw.stop()
        a.stop()
        b.stop()


def test_breaker_opens_on_5xx_and_half_open_trial_closes_it() -> None:
    a, b = Sim(None), Sim(None)
    gw = Gateway(
        [a.url, b.url],
        env={"GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "3", "GATEWAY_RESILIENCE__BREAKER_RESET_SECONDS": "3"},
    )
    try:
        a.control(fault="status:503")  # overloaded replica: retryable, counts against its breaker
        c = openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0, timeout=30)
        for _ in range(20):
            r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)  # type: ignore[arg-type]
            assert r.choices[0].message.content == " resilient"  # retried on b: no client error
            if _health(gw)[a.url]["breaker"] == "open":
                break
        assert _health(gw)[a.url]["breaker"] == "open"
        hits_while_open = a.stats()["received"]
        for _ in range(5):
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)  # type: ignore[arg-type]
        assert a.stats()["received"] == hits_while_open  # skipped while open
        a.control(fault="")
        time.sleep(3.2)  # reset timeout: the next request may be a trial
        for _ in range(6):
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)  # type: ignore[arg-type]
        assert _health(gw)[a.url]["breaker"] == "closed"
        metrics = httpx.get(gw.url + "/metrics").text
        assert "gateway_backend_up" in metrics
    finally:
        gw.stop()
        a.stop()
        b.stop()


def test_4xx_never_opens_the_breaker() -> None:
    a = Sim(None)
    gw = Gateway([a.url], env={"GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "2"})
    try:
        c = openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0)
        for _ in range(5):
            try:
                c.chat.completions.create(model="tiny", messages=MSG, max_tokens=600)  # type: ignore[arg-type]
            except openai.BadRequestError:
                pass
        assert _health(gw)[a.url]["breaker"] == "closed"
        assert c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1).choices  # type: ignore[arg-type]
    finally:
        gw.stop()
        a.stop()


def test_mid_stream_failure_is_not_retried() -> None:
    a, b = Sim(None), Sim(None)
    gw = Gateway([a.url, b.url], env={"GATEWAY_RESILIENCE__BREAKER_FAIL_MAX": "100"})
    try:
        a.control(fault="drop:2")
        b.control(fault="drop:2")
        with httpx.stream(
            "POST", gw.v1 + "/chat/completions", json={"model": "tiny", "messages": MSG, "stream": True}
        ) as r:
            body = b"".join(r.iter_raw())
        assert body.endswith(b"data: [DONE]\n\n")
        assert b'"code":"upstream_error"' in body
        assert a.stats()["received"] + b.stats()["received"] == 1  # one attempt only
    finally:
        gw.stop()
        a.stop()
        b.stop()
