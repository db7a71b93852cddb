"""Queued requests go as soon as capacity exists, through real gateway and simulator processes.

Two faults of one kind: the admission queue's idea of free capacity differed from the router's.

* A replica whose breaker opened gets capacity back at its reset time (a trial may go) without any
  request ending; the queue must be dispatched then, not when the next request ends (or never,
  ending in 503 queue_timeout).
* One replica serving two models (vLLM with a LoRA adapter, or two served names) runs
  ``max_in_flight`` requests in all: a request for the other model queues while it is full and is
  served when it frees, instead of an instant 503 no_backend_available.

The in-process unit tests (tests/unit/test_admission_wakeups.py, test_shared_replica_capacity.py)
cover the sibling cases: a closed breaker, a failed trial, trial slots, stranded requests,
replicas serving different sets of models, ordering across models.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.procs import Gateway, Sim, until

MSG = [{"role": "user", "content": "wake me"}]
LONG = 300  # tokens: 15 s at 0.05 s per token, far beyond every wait below
FLAGS = ("--ttft", "0.01", "--itl", "0.05", "--output-tokens", "400")


def gateway_for(tmp_path: Path, cfg: dict[str, Any]) -> Gateway:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Gateway([], config=path)


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """Sum of a gauge's samples whose labels include ``labels`` (simple Prometheus text parse)."""
    total = 0.0
    for line in httpx.get(gw.url + "/metrics", timeout=5).text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def breaker_of(gw: Gateway, sim: Sim) -> str:
    backends = httpx.get(gw.url + "/health", timeout=5).json()["backends"]
    state: str = next(b["breaker"] for b in backends if b["url"] == sim.url)
    return state


def body(model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": MSG, "max_tokens": max_tokens, "stream": stream}


def complete(gw: Gateway, payload: dict[str, Any]) -> tuple[int, dict[str, str], str]:
    """Status, headers and the whole body (a stream read to its end)."""
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=payload, timeout=60) as r:
        text = r.read().decode()
        return r.status_code, dict(r.headers), text


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as ex:
        yield ex


# ----------------------------------------------------------------------------- breaker reset


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_queued_request_goes_to_a_replica_whose_breaker_reaches_its_reset_time(
    tmp_path: Path, pool: ThreadPoolExecutor, stream: bool
) -> None:
    """A's breaker is open (4 s), B is busy for 15 s: the queued request is served by A at A's
    reset time, long before its queue_timeout (10 s) and B's end."""
    a, b = Sim(None, *FLAGS), Sim(None, *FLAGS)
    gw: Gateway | None = None
    try:
        gw = gateway_for(
            tmp_path,
            {
                "backends": [{"url": s.url, "max_in_flight": 1} for s in (a, b)],
                "resilience": {"breaker_fail_max": 1, "breaker_reset_seconds": 4},
                "admission": {"queue_timeout": 10},
            },
        )
        g = gw
        a.control(fault="status:503")
        for _ in range(20):  # round-robin between the two: one of these lands on A (retried on B)
            assert complete(g, body("tiny", 1, False))[0] == 200
            if breaker_of(g, a) == "open":
                break
        assert breaker_of(g, a) == "open"
        a.control(fault="")
        with httpx.stream(
            "POST", g.v1 + "/chat/completions", json=body("tiny", LONG, True), timeout=60
        ) as busy:
            assert busy.status_code == 200
            assert busy.headers["x-gateway-backend"] == b.url.split("://", 1)[1]  # A is ejected
            queued: Future[tuple[int, dict[str, str], str]] = pool.submit(
                complete, g, body("tiny", 2, stream)
            )
            until(lambda: queued.done() or metric(g, "gateway_queue_depth", model="tiny") == 1, "queued")
            assert not queued.done(), queued.result()
            status, headers, text = queued.result()
            assert status == 200, text
            assert headers["x-gateway-backend"] == a.url.split("://", 1)[1]
            assert (text.rstrip().endswith("data: [DONE]")) is stream
        until(lambda: breaker_of(g, a) == "closed", "A's breaker closed by its successful trial")
    finally:
        if gw is not None:
            gw.stop()
        a.stop()
        b.stop()


# ----------------------------------------------------------------------------- shared replica


@pytest.mark.parametrize(
    ("holder", "queued_model", "stream"),
    [("a", "b", False), ("b", "a", True)],
    ids=["a-then-b-plain", "b-then-a-stream"],
)
def test_a_request_for_the_other_model_of_a_busy_replica_queues_and_is_served(
    tmp_path: Path, pool: ThreadPoolExecutor, holder: str, queued_model: str, stream: bool
) -> None:
    sim = Sim(None, "--model", "a", "--model", "b", "--max-num-seqs", "1", *FLAGS)
    gw: Gateway | None = None
    try:
        gw = gateway_for(
            tmp_path,
            {"backends": [{"url": sim.url, "max_in_flight": 1}], "admission": {"queue_timeout": 30}},
        )
        g = gw
        first = pool.submit(complete, g, body(holder, 40, False))  # ~2 s on the only slot
        until(lambda: metric(g, "gateway_pool_in_flight", model=holder) == 1, "the replica busy")
        second = pool.submit(complete, g, body(queued_model, 2, stream))
        until(
            lambda: second.done() or metric(g, "gateway_queue_depth", model=queued_model) == 1,
            f"the {queued_model} request queued",
        )
        assert not second.done(), second.result()  # not refused: 503 no_backend_available
        status, _, text = first.result()
        assert status == 200, text
        status, headers, text = second.result()
        assert status == 200, text
        assert headers["x-gateway-backend"] == sim.url.split("://", 1)[1]
        assert (text.rstrip().endswith("data: [DONE]")) is stream
        stats = sim.stats()
        assert stats["received"] == 2
        assert stats["completed"] == 2
    finally:
        if gw is not None:
            gw.stop()
        sim.stop()
