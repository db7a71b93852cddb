"""The response cache (docs/cache.md), through real processes: a simulator, gateways, Redis.

Every test uses prompts of its own (a random tag), so entries never cross tests; the simulator's
``received`` count (requests that reached it) says whether the backend was asked.
"""

from __future__ import annotations

import secrets
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from tests.jobs_helpers import ALICE, BOB, CAROL, PrivateRedis, poll, sha
from tests.procs import Gateway, Sim

ADMIN = "sk-admin-" + "d" * 24
PLAIN_ONLY = "sk-plain-" + "e" * 24  # team search, tier `tight`: 3 requests / 60 tokens a minute
LONE = "sk-lone-" + "f" * 24  # subject `lone`, no team
JWT_SECRET = "cache-test-secret-" + "x" * 32


def cache_config(tmp: Path, storage: str = "redis://127.0.0.1:6379/0", **cache: Any) -> Path:
    cfg: dict[str, Any] = {
        "auth": {
            "api_keys": [
                {"sha256": sha(ALICE), "subject": "alice", "team": "search"},
                {"sha256": sha(BOB), "subject": "bob", "team": "search"},
                {"sha256": sha(CAROL), "subject": "carol", "team": "research"},
                {"sha256": sha(ADMIN), "subject": "root", "team": "ops", "scopes": ["admin"]},
                {"sha256": sha(PLAIN_ONLY), "subject": "tight", "team": "search", "tier": "tight"},
                {"sha256": sha(LONE), "subject": "lone"},
            ],
            "jwt": {"secret": JWT_SECRET},
        },
        "tiers": {"tight": {"requests_per_minute": 3, "tokens_per_minute": 60}},
        "teams": {"search": {}, "research": {}, "ops": {}},
        "routing": {"routes": {"classify": {}, "chat": {}}, "aliases": {"fast": "tiny"}},
        "cache": {
            "storage": storage,
            "key_prefix": f"test:cache:{secrets.token_hex(4)}:",
            "routes": {"classify": {"when": "always"}, "chat": {"when": "never"}},
            **cache,
        },
    }
    path = tmp / f"cache-{secrets.token_hex(3)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def with_jobs(cfg: Path, tmp: Path) -> Path:
    """The config with async jobs on (their own Redis key prefix and file directory)."""
    data = yaml.safe_load(cfg.read_text())
    data["jobs"] = {
        "enabled": True,
        "key_prefix": f"test:jobs:{secrets.token_hex(4)}:",
        "files": f"file://{tmp / 'files'}",
    }
    cfg.write_text(yaml.safe_dump(data))
    return cfg


@pytest.fixture(scope="module")
def csim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0.02", "--itl", "0.005", "--embedding-model", "embed-small")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cgw(csim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway([csim.url], config=cache_config(tmp_path_factory.mktemp("cache")))
    yield g
    g.stop()


def ask(gw: Gateway, key: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        gw.v1 + ("/embeddings" if "input" in body else "/chat/completions"),
        json=body,
        headers={"authorization": f"Bearer {key}", **(headers or {})},
        timeout=30,
    )


def chat_body(tag: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"say {tag}"}],
        "temperature": 0,
        "max_tokens": 6,
        **extra,
    }


def received(sim: Sim) -> int:
    return int(sim.stats()["received"])


def sse_content(raw: bytes) -> tuple[str, list[dict[str, Any]]]:
    """(joined delta content, the chunks) of an SSE body ending in [DONE]."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    chunks = [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    text = "".join(
        c.get("delta", {}).get("content") or "" for chunk in chunks for c in chunk.get("choices", [])
    )
    return text, chunks


def sdk(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)


# -- hits in every form ------------------------------------------------------------------------


def test_plain_then_plain_is_a_byte_identical_hit(cgw: Gateway, csim: Sim) -> None:
    tag = secrets.token_hex(4)
    client = sdk(cgw, ALICE)
    before = received(csim)
    first = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": f"say {tag}"}], temperature=0, max_tokens=6
    )
    assert first.headers["x-gateway-cache"] == "miss"
    assert first.headers["age"] == "0"
    second = poll(
        lambda: client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": f"say {tag}"}], temperature=0, max_tokens=6
        ),
        lambda r: r.headers["x-gateway-cache"] == "hit",
        10,
        "the fill",  # the fill is written after the first answer, in a task of its own
    )
    assert second.http_response.content == first.http_response.content
    assert int(second.headers["age"]) >= 0
    assert second.headers["x-gateway-backend"] == "cache"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert received(csim) == before + 1


def _wait_hit(gw: Gateway, key: str, body: dict[str, Any]) -> httpx.Response:
    return poll(lambda: ask(gw, key, body), lambda r: r.headers.get("x-gateway-cache") == "hit", 10, "a hit")


def test_stream_replayed_as_the_same_sse(cgw: Gateway, csim: Sim) -> None:
    body = chat_body(secrets.token_hex(4), stream=True)
    before = received(csim)
    first = ask(cgw, ALICE, body)
    assert first.headers["x-gateway-cache"] == "miss"
    second = _wait_hit(cgw, ALICE, body)
    assert second.headers["content-type"].startswith("text/event-stream")
    # Same chunk structure, same bytes: what the client got the first time (usage stripped and
    # the fingerprint where vLLM puts it without include_usage).
    assert second.content == first.content
    assert received(csim) == before + 1
    # Asked with include_usage, the replay carries vLLM's usage chunk.
    third = ask(cgw, ALICE, {**body, "stream_options": {"include_usage": True}})
    assert third.headers["x-gateway-cache"] == "hit"
    text, chunks = sse_content(third.content)
    assert text == sse_content(first.content)[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert received(csim) == before + 1


def test_stream_stored_served_plain(cgw: Gateway, csim: Sim) -> None:
    tag = secrets.token_hex(4)
    first = ask(cgw, ALICE, chat_body(tag, stream=True, stream_options={"include_usage": True}))
    text, chunks = sse_content(first.content)
    plain = poll(
        lambda: ask(cgw, ALICE, chat_body(tag)),
        lambda r: r.headers["x-gateway-cache"] == "hit",
        10,
        "the stream's entry served plain",
    )
    answer = plain.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == text
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == chunks[-1]["usage"]
    assert answer["id"] == chunks[0]["id"]


def test_plain_stored_served_as_stream(cgw: Gateway, csim: Sim) -> None:
    tag = secrets.token_hex(4)
    first = ask(cgw, ALICE, chat_body(tag)).json()
    client = sdk(cgw, ALICE)

    def streamed() -> tuple[str, Any, str]:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny",
            messages=[{"role": "user", "content": f"say {tag}"}],
            temperature=0,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return raw.headers["x-gateway-cache"], chunks, text

    _, chunks, text = poll(streamed, lambda r: r[0] == "hit", 10, "the plain entry as a stream")
    assert text == first["choices"][0]["message"]["content"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == first["usage"]["total_tokens"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_embeddings_are_always_cached(cgw: Gateway, csim: Sim) -> None:
    body = {"model": "embed-small", "input": f"text {secrets.token_hex(4)}"}
    first = ask(cgw, ALICE, body)
    assert first.headers["x-gateway-cache"] == "miss"
    assert _wait_hit(cgw, ALICE, body).content == first.content


# -- what makes a different key ----------------------------------------------------------------


def test_other_temperature_team_or_weights_is_a_miss(cgw: Gateway, csim: Sim) -> None:
    tag = secrets.token_hex(4)
    seeded = chat_body(tag, seed=7)
    ask(cgw, ALICE, seeded)
    _wait_hit(cgw, ALICE, seeded)
    assert _wait_hit(cgw, BOB, seeded).headers["x-gateway-cache"] == "hit"  # bob: same team
    assert ask(cgw, ALICE, {**seeded, "temperature": 0.7}).headers["x-gateway-cache"] == "miss"
    # Fields that do not change the answer are not in the key.
    same = {**seeded, "user": "someone", "stream": False, "metadata": {"x": "y"}}
    assert ask(cgw, ALICE, same).headers["x-gateway-cache"] == "hit"
    # Another team never sees the entry.
    before = received(csim)
    other = ask(cgw, CAROL, seeded)
    assert other.headers["x-gateway-cache"] == "miss"
    assert received(csim) == before + 1
    # New weights (vLLM's /v1/models root changes): every entry of the model is a miss.
    csim.control(weights="v2")
    try:
        poll(
            lambda: httpx.get(cgw.v1 + "/models", headers={"authorization": f"Bearer {ALICE}"}).json(),
            lambda m: any(c.get("root") == "/models/tiny@v2" for c in m["data"]),
            10,
            "the new weights seen by the gateway",
        )
        assert ask(cgw, ALICE, seeded).headers["x-gateway-cache"] == "miss"
    finally:
        csim.control(weights="")
        # Back to the old weights before the next test: seen mid-test, the change of version
        # would make its second request a miss (the key changed between the two).
        poll(
            lambda: httpx.get(cgw.v1 + "/models", headers={"authorization": f"Bearer {ALICE}"}).json(),
            lambda m: not any(str(c.get("root")).endswith("@v2") for c in m["data"]),
            10,
            "the old weights seen by the gateway",
        )


def test_nondeterministic_requests_bypass(cgw: Gateway, csim: Sim) -> None:
    body = chat_body(secrets.token_hex(4))
    del body["temperature"]
    for _ in range(2):
        r = ask(cgw, ALICE, body)
        assert r.headers["x-gateway-cache"] == "bypass"
        assert "age" not in r.headers
    # A route with `when: always` caches it; `when: never` does not even look.
    always = ask(cgw, ALICE, body, {"x-task-type": "classify"})
    assert always.headers["x-gateway-cache"] == "miss"
    hit = poll(
        lambda: ask(cgw, ALICE, body, {"x-task-type": "classify"}),
        lambda r: r.headers["x-gateway-cache"] == "hit",
        10,
        "a hit on the always route",
    )
    assert hit.content == always.content
    assert ask(cgw, ALICE, chat_body("x"), {"x-task-type": "chat"}).headers["x-gateway-cache"] == "bypass"


# -- Cache-Control -------------------------------------------------------------------------------


def test_cache_control_directives(cgw: Gateway, csim: Sim) -> None:
    body = chat_body(secrets.token_hex(4))
    before = received(csim)
    nostore = ask(cgw, ALICE, body, {"cache-control": "no-store"})
    assert nostore.headers["x-gateway-cache"] == "bypass"
    assert ask(cgw, ALICE, body, {"cache-control": "no-store"}).headers["x-gateway-cache"] == "bypass"
    assert received(csim) == before + 2
    # only-if-cached: nothing stored (no-store stored nothing) → 504, OpenAI-shaped.
    refused = ask(cgw, ALICE, body, {"cache-control": "only-if-cached"})
    assert refused.status_code == 504
    assert refused.json()["error"]["code"] == "cache_miss"
    assert received(csim) == before + 2
    first = ask(cgw, ALICE, body)
    _wait_hit(cgw, ALICE, body)
    # no-cache: not looked up (the backend answers again), but stored.
    fresh = ask(cgw, ALICE, body, {"cache-control": "no-cache"})
    assert fresh.headers["x-gateway-cache"] == "miss"
    assert received(csim) == before + 4
    assert ask(cgw, ALICE, body, {"cache-control": "only-if-cached"}).headers["x-gateway-cache"] == "hit"
    # max-age: only entries younger than N seconds.
    poll(lambda: ask(cgw, ALICE, body), lambda r: int(r.headers.get("age", 0)) >= 1, 10, "an entry 1 s old")
    n = received(csim)
    young = ask(cgw, ALICE, body, {"cache-control": "max-age=0"})
    assert young.headers["x-gateway-cache"] == "miss"
    assert received(csim) == n + 1
    assert ask(cgw, ALICE, body, {"cache-control": "max-age=3600"}).headers["x-gateway-cache"] == "hit"
    assert first.status_code == 200


# -- only complete answers are kept -------------------------------------------------------------


def test_truncated_or_failed_answers_are_never_stored(cgw: Gateway, csim: Sim) -> None:
    for fault, stream in (
        ("drop:2", True),
        ("status:500", False),
        ("error-event:2", True),
        ("status:400", False),
    ):
        body = chat_body(secrets.token_hex(4), stream=stream)
        csim.control(fault=fault)  # the gateway does not forward a client's x-sim-fault header
        try:
            broken = ask(cgw, ALICE, body)
        finally:
            csim.control(fault="")
        assert broken.headers["x-gateway-cache"] == "miss"
        assert broken.status_code != 200 or b'"error"' in broken.content, fault
        # The failed filler released its lock: the next identical request asks the backend at
        # once (no single-flight wait), and its complete answer is the one kept.
        before = received(csim)
        again = ask(cgw, ALICE, body)
        assert again.status_code == 200
        assert again.headers["x-gateway-cache"] == "miss", fault
        assert received(csim) == before + 1
        assert _wait_hit(cgw, ALICE, body).headers["x-gateway-cache"] == "hit"


def test_client_gone_mid_stream_is_not_stored(cgw: Gateway, csim: Sim) -> None:
    body = chat_body(secrets.token_hex(4), stream=True, max_tokens=200)
    with httpx.stream(
        "POST",
        cgw.v1 + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {ALICE}"},
        timeout=30,
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first event
    cgw.wait_log(lambda rec: rec.get("event") == "request" and rec.get("client_disconnected") is True)
    before = received(csim)
    assert ask(cgw, ALICE, body).headers["x-gateway-cache"] == "miss"
    assert received(csim) == before + 1


# -- single flight ---------------------------------------------------------------------------------


def test_identical_concurrent_misses_over_two_replicas_make_one_upstream_call(tmp_path: Path) -> None:
    sim = Sim(None, "--ttft", "1.0", "--itl", "0.01")
    cfg = cache_config(tmp_path)
    gws = [Gateway([sim.url], config=cfg), Gateway([sim.url], config=cfg)]
    try:
        body = chat_body(secrets.token_hex(4))
        before = received(sim)
        start = threading.Barrier(50)

        def one(i: int) -> httpx.Response:
            start.wait()
            return ask(gws[i % 2], ALICE, body)

        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(one, range(50)))
        assert [r.status_code for r in answers] == [200] * 50
        assert received(sim) == before + 1, [g.log_lines()[-30:] for g in gws]
        contents = {r.json()["choices"][0]["message"]["content"] for r in answers}
        assert len(contents) == 1
        states = sorted(r.headers["x-gateway-cache"] for r in answers)
        assert states.count("miss") == 1 and states.count("hit") == 49
    finally:
        for g in gws:
            g.stop()
        sim.stop()


# -- faults ------------------------------------------------------------------------------------------


def test_redis_stopped_mid_run_costs_no_client_errors(tmp_path: Path) -> None:
    redis = PrivateRedis(tmp_path)
    redis.start()
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.002")
    gw = Gateway([sim.url], config=cache_config(tmp_path, storage=redis.url, retry_interval=0.5))
    try:
        bodies = [chat_body(f"{secrets.token_hex(3)}-{i % 5}") for i in range(5)]
        statuses: list[int] = []
        seen: set[str] = set()
        stop = threading.Event()

        def load() -> None:
            i = 0
            while not stop.is_set():
                r = ask(gw, ALICE, bodies[i % 5] | {"stream": bool(i % 2)})
                statuses.append(r.status_code)
                seen.add(r.headers.get("x-gateway-cache", "-"))
                i += 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        poll(lambda: set(seen), lambda s: "hit" in s, 20, "hits before the outage")
        redis.stop()
        poll(lambda: set(seen), lambda s: "bypass" in s, 20, "bypasses during the outage")
        n = len(statuses)
        poll(lambda: len(statuses), lambda k: k >= n + 40, 30, "requests served during the outage")
        seen.clear()
        redis.start()
        poll(lambda: set(seen), lambda s: "hit" in s, 30, "hits after Redis came back")
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert statuses and set(statuses) == {200}
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'gateway_cache_bypasses_total{reason="unavailable"}' in metrics
    finally:
        gw.stop()
        sim.stop()
        redis.stop()


def test_redis_that_never_answers_is_bypassed(tmp_path: Path) -> None:
    """A Redis that accepts connections and then says nothing (a hung primary, a black hole)."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        hole.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(hole.accept()[0])
            except OSError:
                continue

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.002")
    url = f"redis://127.0.0.1:{hole.getsockname()[1]}/0"
    gw = Gateway([sim.url], config=cache_config(tmp_path, storage=url))
    try:
        for stream in (False, True, False):
            r = ask(gw, ALICE, chat_body(secrets.token_hex(4), stream=stream))
            assert r.status_code == 200
            assert r.headers["x-gateway-cache"] == "bypass"
    finally:
        gw.stop()
        sim.stop()
        stop.set()
        acceptor.join()
        for s in held:
            s.close()
        hole.close()


# -- limits and control ------------------------------------------------------------------------------


def test_hits_count_as_requests_but_not_tokens(cgw: Gateway, csim: Sim) -> None:
    body = chat_body(secrets.token_hex(4), max_tokens=20)
    first = ask(cgw, PLAIN_ONLY, body)  # the tier allows 3 requests and 60 tokens a minute
    assert first.headers["x-gateway-cache"] == "miss"
    second = _wait_hit(cgw, PLAIN_ONLY, body)  # the fill lands before the second request
    third = ask(cgw, PLAIN_ONLY, body)
    assert third.headers["x-gateway-cache"] == "hit"
    # A hit takes no tokens: what the miss left stays for the next one.
    assert third.headers["x-ratelimit-remaining-tokens"] == second.headers["x-ratelimit-remaining-tokens"]
    assert int(third.headers["x-ratelimit-remaining-requests"]) == 0
    # ... but it is a request: the fourth of the minute is refused, hit or not.
    fourth = ask(cgw, PLAIN_ONLY, body)
    assert fourth.status_code == 429
    assert fourth.json()["error"]["code"] == "rate_limit_exceeded"


def test_purge_by_team_and_model_needs_admin(cgw: Gateway, csim: Sim) -> None:
    tag = secrets.token_hex(4)
    body = chat_body(tag)
    for key in (ALICE, CAROL):
        ask(cgw, key, body)
        _wait_hit(cgw, key, body)
    refused = httpx.delete(cgw.v1 + "/cache", headers={"authorization": f"Bearer {ALICE}"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "permission_denied"
    purged = httpx.delete(
        cgw.v1 + "/cache", params={"team": "search"}, headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert purged.status_code == 200 and purged.json()["deleted"] >= 1
    assert ask(cgw, ALICE, body).headers["x-gateway-cache"] == "miss"
    assert ask(cgw, CAROL, body).headers["x-gateway-cache"] == "hit"  # another team's entries stay
    by_model = httpx.delete(
        cgw.v1 + "/cache", params={"model": "tiny"}, headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert by_model.json()["deleted"] >= 1
    assert ask(cgw, CAROL, body).headers["x-gateway-cache"] == "miss"


def test_metrics_count_hits_and_saved_tokens(cgw: Gateway, csim: Sim) -> None:
    body = chat_body(secrets.token_hex(4))
    ask(cgw, ALICE, body)
    _wait_hit(cgw, ALICE, body)
    text = httpx.get(cgw.url + "/metrics").text
    assert (
        'gateway_cache_requests_total{endpoint="chat",model="tiny",result="hit",route="default",team="search"}'
        in text
    )
    assert (
        'gateway_cache_saved_tokens_total{kind="completion",model="tiny",route="default",team="search"}'
        in text
    )
    assert "gateway_cache_hit_seconds_bucket" in text


def test_job_lines_are_served_from_the_cache(tmp_path: Path) -> None:
    """A job line runs through the same stage (ProxyEndpoint.execute): a duplicate is a hit."""
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.002")
    cfg = with_jobs(cache_config(tmp_path), tmp_path)
    gw = Gateway([sim.url], config=cfg)
    try:
        body = chat_body(secrets.token_hex(4))
        h = {"authorization": f"Bearer {ALICE}"}
        sync = ask(gw, ALICE, body)
        assert sync.headers["x-gateway-cache"] == "miss"
        _wait_hit(gw, ALICE, body)
        before = received(sim)
        r = httpx.post(gw.v1 + "/chat/completions", json=body, headers={**h, "prefer": "respond-async"})
        assert r.status_code == 202, r.text
        done = poll(
            lambda: httpx.get(gw.url + r.headers["location"], headers=h).json(),
            lambda j: j["status"] in ("completed", "failed"),
            30,
            "the job",
        )
        assert done["response"]["status_code"] == 200
        assert done["response"]["body"] == sync.json()
        assert received(sim) == before
    finally:
        gw.stop()
        sim.stop()


SCHEMAS = Path(__file__).parent / "fixtures" / "openai-openapi"


def _vllms_usage(answer: dict[str, Any]) -> dict[str, Any]:
    """vLLM's usage carries ``*_tokens_details: null`` where OpenAI's schema wants an object or
    nothing; it is vLLM's (passed on as it came, recorded in the fixtures), not the cache's."""
    if isinstance(answer.get("usage"), dict):
        answer["usage"] = {k: v for k, v in answer["usage"].items() if v is not None}
    return answer


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` in JSON Schema's terms (a ``null`` type beside the other)."""
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False) is True and "type" in node:
            node["type"] = (
                [node["type"], "null"] if isinstance(node["type"], str) else [*node["type"], "null"]
            )
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


def _validator(name: str) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(_nullable(orjson.loads((SCHEMAS / name).read_bytes())))


def test_converted_answers_match_openais_schema(cgw: Gateway, csim: Sim) -> None:
    """What the cache builds itself (a stream folded into one body, a body cut into chunks) is
    valid against OpenAI's published schemas, for chat and completions."""
    chat, chunk, comp = (
        _validator(n)
        for n in (
            "chat_completion.schema.json",
            "chat_completion_chunk.schema.json",
            "completion.schema.json",
        )
    )
    tag = secrets.token_hex(4)
    ask(cgw, ALICE, chat_body(tag, stream=True, n=2))
    folded = poll(
        lambda: ask(cgw, ALICE, chat_body(tag, n=2)),
        lambda r: r.headers["x-gateway-cache"] == "hit",
        10,
        "fold",
    ).json()
    assert [c["index"] for c in folded["choices"]] == [0, 1]
    chat.validate(_vllms_usage(folded))
    tag = secrets.token_hex(4)
    ask(cgw, ALICE, chat_body(tag))
    cut = poll(
        lambda: ask(cgw, ALICE, chat_body(tag, stream=True, stream_options={"include_usage": True})),
        lambda r: r.headers["x-gateway-cache"] == "hit",
        10,
        "cut",
    )
    for c in sse_content(cut.content)[1]:
        chunk.validate(_vllms_usage(c))
    prompt = {"model": "tiny", "prompt": f"count {secrets.token_hex(4)}", "max_tokens": 5, "seed": 1}
    url = cgw.v1 + "/completions"
    h = {"authorization": f"Bearer {ALICE}"}
    streamed = httpx.post(url, json={**prompt, "stream": True}, headers=h)
    text = "".join(
        orjson.loads(e[6:])["choices"][0]["text"]
        for e in streamed.content.split(b"\n\n")
        if e.startswith(b"data: {") and b'"choices":[]' not in e
    )
    plain = poll(
        lambda: httpx.post(url, json=prompt, headers=h),
        lambda r: r.headers["x-gateway-cache"] == "hit",
        10,
        "c",
    ).json()
    assert plain["choices"][0]["text"] == text
    comp.validate(_vllms_usage(plain))


# -- what adversarial review found (each failed before its fix) -------------------------------------


def test_a_jwt_subject_never_shares_an_api_keys_entries(cgw: Gateway, csim: Sim) -> None:
    import time

    from jose import jwt as jose_jwt

    body = chat_body(secrets.token_hex(4))
    ask(cgw, LONE, body)
    assert _wait_hit(cgw, LONE, body).headers["x-gateway-cache"] == "hit"
    token = jose_jwt.encode({"sub": "lone", "exp": int(time.time()) + 300}, JWT_SECRET, algorithm="HS256")
    as_jwt = ask(cgw, token, body)
    assert as_jwt.status_code == 200
    assert as_jwt.headers["x-gateway-cache"] == "miss"


def test_every_cache_control_line_counts(cgw: Gateway, csim: Sim) -> None:
    body = chat_body(secrets.token_hex(4))
    r = httpx.post(
        cgw.v1 + "/chat/completions",
        json=body,
        headers=[
            ("authorization", f"Bearer {ALICE}"),
            ("cache-control", "max-age=60"),
            ("cache-control", "no-store"),
        ],
    )
    assert r.headers["x-gateway-cache"] == "bypass"
    assert ask(cgw, ALICE, body, {"cache-control": "no-store;"}).headers["x-gateway-cache"] == "bypass"
    refused = ask(cgw, ALICE, body, {"cache-control": "only-if-cached"})
    assert refused.status_code == 504
    assert refused.headers["x-gateway-cache"] == "miss"


def test_one_spelling_per_number(cgw: Gateway, csim: Sim) -> None:
    body = chat_body(secrets.token_hex(4))
    ask(cgw, ALICE, body)
    _wait_hit(cgw, ALICE, body)
    assert ask(cgw, ALICE, {**body, "temperature": 0.0}).headers["x-gateway-cache"] == "hit"
    assert ask(cgw, ALICE, {**body, "temperature": -0.0}).headers["x-gateway-cache"] == "hit"


def test_purge_refuses_what_it_does_not_understand(cgw: Gateway, csim: Sim) -> None:
    h = {"authorization": f"Bearer {ADMIN}"}
    for params in ({"teams": "search"}, {}, {"all": "yes"}, {"all": "true", "team": "search"}):
        r = httpx.delete(cgw.v1 + "/cache", params=params, headers=h)
        assert r.status_code == 400, params
        assert r.json()["error"]["type"] == "invalid_request_error"
    twice = httpx.delete(cgw.v1 + "/cache?team=search&team=research", headers=h)
    assert twice.status_code == 400
    body = chat_body(secrets.token_hex(4))
    ask(cgw, CAROL, body)
    _wait_hit(cgw, CAROL, body)
    by_alias = httpx.delete(cgw.v1 + "/cache", params={"model": "fast", "team": "research"}, headers=h)
    assert by_alias.json()["model"] == "tiny" and by_alias.json()["deleted"] >= 1
    assert ask(cgw, CAROL, body).headers["x-gateway-cache"] == "miss"


def test_a_waiter_does_not_outwait_a_redis_that_died(tmp_path: Path) -> None:
    """Another replica's waiter sees Redis go and asks the backend itself, without waiting out
    `single_flight_wait` for a notice that cannot come."""
    server = PrivateRedis(tmp_path)
    server.start()
    sim = Sim(None, "--ttft", "4", "--itl", "0.01")
    cfg = cache_config(tmp_path, storage=server.url, single_flight_wait=60)
    a, b = Gateway([sim.url], config=cfg), Gateway([sim.url], config=cfg)
    lock_seen = redis_client(server.url)
    try:
        body = chat_body(secrets.token_hex(4))
        before = received(sim)
        with ThreadPoolExecutor(2) as pool:
            filler = pool.submit(ask, a, ALICE, body)
            poll(lambda: lock_seen.keys("*:l:*"), bool, 10, "the filler's lock")
            waiter = pool.submit(ask, b, ALICE, body)
            poll(lambda: received(sim), lambda n: n == before + 1, 10, "the filler at the backend")
            server.stop()
            poll(lambda: received(sim), lambda n: n == before + 2, 10, "the waiter asking the backend")
            assert filler.result().status_code == 200
            assert waiter.result().status_code == 200
    finally:
        lock_seen.close()
        a.stop()
        b.stop()
        sim.stop()
        server.stop()


def test_a_better_priority_does_not_wait_behind_a_job(tmp_path: Path) -> None:
    """The filler is a job line (the lowest admission priority): an interactive request for the
    same answer asks the backend itself instead of waiting behind it."""
    sim = Sim(None, "--ttft", "4", "--itl", "0.01")
    cfg = with_jobs(cache_config(tmp_path, single_flight_wait=60), tmp_path)
    data = yaml.safe_load(cfg.read_text())
    gw = Gateway([sim.url], config=cfg)
    r = redis_client("redis://127.0.0.1:6379/0")
    try:
        body = chat_body(secrets.token_hex(4))
        before = received(sim)
        h = {"authorization": f"Bearer {ALICE}", "prefer": "respond-async"}
        assert httpx.post(gw.v1 + "/chat/completions", json=body, headers=h).status_code == 202
        prefix = data["cache"]["key_prefix"]
        poll(lambda: r.keys(prefix + "l:*"), bool, 10, "the job's lock")
        poll(lambda: received(sim), lambda n: n == before + 1, 10, "the job at the backend")
        with ThreadPoolExecutor(1) as pool:
            interactive = pool.submit(ask, gw, ALICE, body)
            poll(lambda: received(sim), lambda n: n == before + 2, 10, "the interactive request upstream")
            assert interactive.result().status_code == 200
    finally:
        r.close()
        gw.stop()
        sim.stop()


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def test_an_external_provider_cannot_take_the_caches_label() -> None:
    from gateway.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"external\.name"):
        load_settings(external={"base_url": "https://provider.example", "name": "cache"})


def _metric(gw: Gateway, name: str) -> float:
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_a_fill_redis_refuses_is_counted_as_an_error_not_a_fill(tmp_path: Path) -> None:
    """A full Redis without eviction refuses writes (``OOM``): the answer is not stored, the client
    is not affected, and the refusal shows in ``gateway_cache_errors_total`` — not as a fill."""
    server = PrivateRedis(tmp_path)
    server.start()
    sim = Sim(None, "--ttft", "0.01", "--itl", "0.002")
    # No single-flight lock: the lookup writes nothing, so only the fill meets the full Redis.
    gw = Gateway([sim.url], config=cache_config(tmp_path, storage=server.url, single_flight_wait=0))
    admin = redis_client(server.url)
    try:
        body = chat_body(secrets.token_hex(4))
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # every write refused from now on
        before = received(sim)
        first = ask(gw, ALICE, body)
        assert first.status_code == 200 and first.headers["x-gateway-cache"] == "miss"
        poll(lambda: _metric(gw, "gateway_cache_errors_total"), lambda n: n >= 1, 10, "the refusal counted")
        assert _metric(gw, "gateway_cache_fills_total") == 0
        again = ask(gw, ALICE, body)
        assert again.status_code == 200 and again.headers["x-gateway-cache"] == "miss"  # nothing stored
        assert received(sim) == before + 2
        admin.config_set("maxmemory", 0)  # room again: the next answer is stored and counted
        assert _wait_hit(gw, ALICE, body).status_code == 200
        poll(lambda: _metric(gw, "gateway_cache_fills_total"), lambda n: n >= 1, 10, "a fill counted")
        assert _metric(gw, "gateway_cache_errors_total") == 2  # the two refused fills, nothing else
    finally:
        admin.close()
        gw.stop()
        sim.stop()
        server.stop()
