"""Response-cache faults found by an adversary (round 4), each through real processes:

* ``scope: principal`` let one subject's request in another team wait for, and be served, the
  first team's answer in flight on the same replica (the digest had no team in it);
* a streamed answer with ``n: 2`` whose second choice never finished was stored;
* a stored answer the rate limits refused to serve (429) was labelled, counted and recorded as a
  hit;
* ``max-age=0`` waited for a fill in flight on the filler's own replica, not on the others.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests import rawbackend
from tests.jobs_helpers import poll, sha
from tests.procs import Gateway, Sim

TWIN_A = "sk-twin-a-" + "a" * 24  # subject `twin`, team search
TWIN_B = "sk-twin-b-" + "b" * 24  # subject `twin`, team research
TIGHT = "sk-tight-" + "c" * 24  # team search, 2 requests a minute


def config(tmp: Path, backend: str, **cache: Any) -> Path:
    cfg: dict[str, Any] = {
        "backends": [{"url": backend}],
        "auth": {
            "api_keys": [
                {"sha256": sha(TWIN_A), "subject": "twin", "team": "search"},
                {"sha256": sha(TWIN_B), "subject": "twin", "team": "research"},
                {"sha256": sha(TIGHT), "subject": "tight", "team": "search", "tier": "tight"},
            ]
        },
        "tiers": {"tight": {"requests_per_minute": 2}},
        "teams": {"search": {}, "research": {}},
        "cache": {
            "storage": "redis://127.0.0.1:6379/0",
            "key_prefix": f"test:cache:{secrets.token_hex(4)}:",
            **cache,
        },
    }
    path = tmp / f"cache-{secrets.token_hex(3)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def chat(tag: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"say {tag}"}],
        "temperature": 0,
        "max_tokens": 6,
        **extra,
    }


def ask(g: Gateway, key: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        g.v1 + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", **(headers or {})},
        timeout=30,
    )


@pytest.fixture
def slow_sim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "1.0", "--itl", "0.005")
    yield s
    s.stop()


def in_flight(
    sim: Sim, g: Gateway, key: str, body: dict[str, Any]
) -> tuple[threading.Thread, list[httpx.Response]]:
    """Send a request in a thread; return once the simulator has it (its answer in flight)."""
    before = int(sim.stats()["received"])
    out: list[httpx.Response] = []
    t = threading.Thread(target=lambda: out.append(ask(g, key, body)))
    t.start()
    poll(lambda: int(sim.stats()["received"]), lambda n: n > before, 10, "first request at the backend")
    return t, out


def test_one_subject_in_two_teams_never_waits_for_the_other_teams_answer(
    slow_sim: Sim, tmp_path: Path
) -> None:
    g = Gateway([], config=config(tmp_path, slow_sim.url, scope="principal"))
    try:
        body = chat(secrets.token_hex(4))
        before = int(slow_sim.stats()["received"])
        t, first = in_flight(slow_sim, g, TWIN_A, body)
        other_team = ask(g, TWIN_B, body)  # same subject, same body, same replica, A in flight
        t.join(30)
        assert first[0].status_code == 200 and other_team.status_code == 200
        assert other_team.headers["x-gateway-cache"] == "miss", other_team.headers
        assert other_team.json()["id"] != first[0].json()["id"]
        assert int(slow_sim.stats()["received"]) == before + 2
        # Each team's own answer is stored for it alone.
        again_a = poll(
            lambda: ask(g, TWIN_A, body), lambda r: r.headers["x-gateway-cache"] == "hit", 10, "A hit"
        )
        again_b = poll(
            lambda: ask(g, TWIN_B, body), lambda r: r.headers["x-gateway-cache"] == "hit", 10, "B hit"
        )
        assert again_a.json()["id"] == first[0].json()["id"]
        assert again_b.json()["id"] == other_team.json()["id"]
    finally:
        g.stop()


def test_max_age_zero_does_not_wait_for_a_fill_on_the_fillers_replica(slow_sim: Sim, tmp_path: Path) -> None:
    g = Gateway([], config=config(tmp_path, slow_sim.url))
    try:
        body = chat(secrets.token_hex(4))
        before = int(slow_sim.stats()["received"])
        t, first = in_flight(slow_sim, g, TWIN_A, body)
        fresh = ask(g, TWIN_A, body, {"cache-control": "max-age=0"})
        t.join(30)
        assert first[0].status_code == 200 and fresh.status_code == 200
        # As on every other replica: nothing the filler stores is young enough, so it asks itself.
        assert fresh.headers["x-gateway-cache"] == "miss", fresh.headers
        assert int(slow_sim.stats()["received"]) == before + 2
    finally:
        g.stop()


def test_a_hit_the_limits_refuse_is_not_a_hit(tmp_path: Path) -> None:
    sim = Sim(None, "--ttft", "0.005", "--itl", "0.001")
    g = Gateway([], config=config(tmp_path, sim.url))
    try:
        body = chat(secrets.token_hex(4))
        assert ask(g, TIGHT, body).headers["x-gateway-cache"] == "miss"
        served = poll(
            lambda: ask(g, TIGHT, body),
            lambda r: r.status_code != 200 or r.headers["x-gateway-cache"] == "hit",
            10,
            "hit",
        )
        assert served.status_code == 200, served.text
        refused = ask(g, TIGHT, body)  # the third request of the minute
        assert refused.status_code == 429, refused.text
        assert "x-gateway-cache" not in refused.headers, refused.headers
        text = httpx.get(g.url + "/metrics", timeout=10).text
        hits = sum(
            float(m.group(1))
            for m in re.finditer(
                r'^gateway_cache_requests_total\{[^}]*result="hit"[^}]*\} (\S+)$', text, re.M
            )
        )
        assert hits == 1.0, [line for line in text.splitlines() if "gateway_cache_requests_total" in line]
    finally:
        g.stop()
        sim.stop()


def _two_choices_one_unfinished(conn: Any) -> None:
    events = []
    base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "tiny"}
    for index in (0, 1):
        delta = {
            "index": index,
            "delta": {"role": "assistant", "content": "hi"},
            "logprobs": None,
            "finish_reason": None,
        }
        events.append({**base, "choices": [delta]})
    events.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    events.append({**base, "choices": [], "usage": usage})
    conn.sendall(rawbackend.SSE_HEAD)
    for e in events:
        conn.sendall(rawbackend.chunk(b"data: " + orjson.dumps(e) + b"\n\n"))
    conn.sendall(rawbackend.chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def test_a_stream_with_an_unfinished_choice_is_not_stored(tmp_path: Path) -> None:
    backend = rawbackend.RawBackend(_two_choices_one_unfinished)
    g = Gateway([], config=config(tmp_path, backend.url))
    try:
        body = chat(secrets.token_hex(4), n=2, stream=True)
        first = ask(g, TWIN_A, body)
        assert first.status_code == 200 and first.headers["x-gateway-cache"] == "miss"
        assert first.content.endswith(b"data: [DONE]\n\n")
        for _ in range(3):  # a fill would land within a few ms; none does
            again = ask(g, TWIN_A, body)
            assert again.headers["x-gateway-cache"] == "miss", again.headers
        assert backend.posts == 4
    finally:
        g.stop()
        backend.stop()
