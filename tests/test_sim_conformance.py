"""The simulator against recorded real vLLM 0.32.0 transcripts (tests/fixtures/vllm-0.32.0-cpu).

What must match is structure, never random values: the same keys in the same order, recursively,
with the same JSON types; the same SSE framing and per-chunk shapes; the same error status, keys
and (where vLLM's text is deterministic) the same message; the same probe answers, content types
and metric names. Then the simulator's own knobs: max_tokens, --max-num-seqs, --load-time,
deterministic text, x-sim-fault faults and client-disconnect accounting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.sim.engine import FINGERPRINT, expected_text
from tests.procs import Sim

FIXTURES = Path(__file__).parent / "fixtures" / "vllm-0.32.0-cpu"
PROMPT = "alpha beta gamma"
MSG = [{"role": "user", "content": PROMPT}]
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


# --------------------------------------------------------------------------- helpers
def fixture_json(name: str) -> Any:
    return orjson.loads((FIXTURES / name).read_bytes())


def fixture_error(name: str) -> tuple[int, dict[str, Any]]:
    """An err_*.json transcript: the body, then the status on the last line."""
    body, status = (FIXTURES / name).read_text().rstrip("\n").rsplit("\n", 1)
    return int(status), orjson.loads(body)


def fixture_headers(name: str) -> tuple[int, dict[str, str]]:
    lines = (FIXTURES / name).read_text().splitlines()
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line.strip():
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return status, headers


def jtype(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "object"


def assert_same_shape(ours: Any, ref: Any, path: str = "$") -> None:
    """Same JSON types and the same keys in the same order, recursively.

    Each element of a list is compared with the reference list's first element.
    """
    assert jtype(ours) == jtype(ref), f"{path}: {jtype(ours)} ({ours!r}) != {jtype(ref)} ({ref!r})"
    if isinstance(ref, dict):
        assert list(ours) == list(ref), f"{path}: keys {list(ours)} != {list(ref)}"
        for key in ref:
            assert_same_shape(ours[key], ref[key], f"{path}.{key}")
    elif isinstance(ref, list):
        assert bool(ours) == bool(ref), f"{path}: {len(ours)} items vs {len(ref)} in the recording"
        for i, item in enumerate(ours):
            assert_same_shape(item, ref[0], f"{path}[{i}]")


def sse_payloads(raw: bytes) -> list[bytes]:
    """vLLM's framing: only `data: <one line>\\n\\n` events, the last one `data: [DONE]`."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    payloads = []
    for event in events[:-1]:
        assert event.startswith(b"data: ") and b"\n" not in event, event[:200]
        payloads.append(event[len(b"data: ") :])
    assert payloads.count(b"[DONE]") == 1
    return payloads[:-1]


def sse_chunks(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(p) for p in sse_payloads(raw)]


def split_stream(chunks: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    """first (chat role chunk), middle token chunks, the last token chunk, the usage chunk."""
    usage = chunks[-1] if chunks[-1]["choices"] == [] else None
    body = chunks[:-1] if usage is not None else chunks
    first = body[0] if chat else None
    tokens = body[1:] if chat else body
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens[:-1])
    assert tokens[-1]["choices"][0]["finish_reason"] is not None
    return {"first": first, "middle": tokens[:-1], "last": tokens[-1], "usage": usage, "tokens": tokens}


def metric_value(text: str, sample: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(f"{sample}{labels}")


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def csim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0.01", "--itl", "0.002")
    yield s
    s.stop()


@pytest.fixture
def c(csim: Sim) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=csim.url, timeout=10) as client:
        yield client


# --------------------------------------------------------------------------- plain responses
def test_chat_plain_matches_recording(c: httpx.Client) -> None:
    r = c.post(CHAT, json={"model": "tiny", "messages": MSG, "max_tokens": 5})
    ref = fixture_json("chat.json")
    assert r.status_code == 200
    body = r.json()
    assert_same_shape(body, ref)
    assert body["id"].startswith("chatcmpl-") and body["object"] == ref["object"]
    assert body["system_fingerprint"] == ref["system_fingerprint"] == FINGERPRINT
    choice = body["choices"][0]
    assert choice["message"]["content"] == expected_text(PROMPT, 5)
    assert choice["finish_reason"] == "length"
    u = body["usage"]
    assert u["completion_tokens"] == 5 and u["total_tokens"] == u["prompt_tokens"] + 5


def test_completions_plain_matches_recording(c: httpx.Client) -> None:
    r = c.post(COMP, json={"model": "tiny", "prompt": "one two three", "max_tokens": 5})
    ref = fixture_json("completions.json")
    assert r.status_code == 200
    body = r.json()
    assert_same_shape(body, ref)
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected_text("one two three", 5)
    assert body["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"] == 3  # one token per word


def test_models_matches_recording(c: httpx.Client) -> None:
    r = c.get("/v1/models")
    assert r.status_code == 200
    ref = fixture_json("models.json")
    assert_same_shape(r.json(), ref)
    card = r.json()["data"][0]
    assert card["id"] == "tiny" and card["max_model_len"] == ref["data"][0]["max_model_len"] == 512
    assert card["owned_by"] == "vllm" and card["root"] == ref["data"][0]["root"]


@pytest.mark.parametrize(
    ("headers_file", "method", "path", "body"),
    [
        ("chat.headers", "POST", CHAT, {"model": "tiny", "messages": MSG, "max_tokens": 2}),
        ("chat_stream.headers", "POST", CHAT, {"model": "tiny", "messages": MSG, "stream": True}),
        ("comp.headers", "POST", COMP, {"model": "tiny", "prompt": "x", "max_tokens": 2}),
        ("models.headers", "GET", "/v1/models", None),
        ("emb.headers", "POST", "/v1/embeddings", {"model": "tiny", "input": "x"}),
    ],
)
def test_status_and_content_headers_match_recording(
    c: httpx.Client, headers_file: str, method: str, path: str, body: dict[str, Any] | None
) -> None:
    status, ref = fixture_headers(headers_file)
    r = c.request(method, path, json=body)
    assert r.status_code == status
    assert r.headers["content-type"] == ref["content-type"]
    assert r.headers["server"] == ref["server"] == "uvicorn"
    # Plain JSON answers carry a Content-Length; streams are chunked.
    assert ("content-length" in r.headers) == ("content-length" in ref)
    assert r.headers.get("transfer-encoding") == ref.get("transfer-encoding")
    if "content-length" in ref:
        assert int(r.headers["content-length"]) == len(r.content)


def test_embeddings_404_on_a_generative_model_matches_recording(c: httpx.Client) -> None:
    status, ref = fixture_error("embeddings.json")
    r = c.post("/v1/embeddings", json={"model": "tiny", "input": "hello"})
    assert (r.status_code, r.json()) == (status, ref)


# --------------------------------------------------------------------------- streams
def test_chat_stream_matches_recording(c: httpx.Client) -> None:
    ref = split_stream(sse_chunks((FIXTURES / "chat_stream.sse").read_bytes()), chat=True)
    r = c.post(CHAT, json={"model": "tiny", "messages": MSG, "max_tokens": 5, "stream": True})
    assert r.status_code == 200
    ours = split_stream(sse_chunks(r.content), chat=True)
    assert ours["usage"] is None and ref["usage"] is None  # not asked for: no usage chunk
    assert ours["first"]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert_same_shape(ours["first"], ref["first"], "first")
    for m in ref["middle"][1:]:  # the recording is self-consistent...
        assert_same_shape(m, ref["middle"][0], "recorded middle")
    for i, m in enumerate(ours["middle"]):  # ...and so are we
        assert_same_shape(m, ref["middle"][0], f"middle[{i}]")
    assert_same_shape(ours["last"], ref["last"], "last")
    assert ours["last"]["system_fingerprint"] == FINGERPRINT
    assert len(ours["tokens"]) == len(ref["tokens"]) == 5
    assert len({ch["id"] for ch in sse_chunks(r.content)}) == 1
    text = "".join(ch["choices"][0]["delta"]["content"] for ch in ours["tokens"])
    assert text == expected_text(PROMPT, 5)


def test_chat_stream_continuous_usage_matches_recording(c: httpx.Client) -> None:
    ref_chunks = sse_chunks((FIXTURES / "chat_stream_continuous_usage.sse").read_bytes())
    body = {
        "model": "tiny",
        "messages": MSG,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    r = c.post(CHAT, json=body)
    assert r.status_code == 200
    chunks = sse_chunks(r.content)
    assert len(chunks) == len(ref_chunks) == 7  # role, 5 tokens, usage
    for i, (ours, ref) in enumerate(zip(chunks, ref_chunks, strict=True)):
        assert_same_shape(ours, ref, f"chunk[{i}]")
    # usage on every chunk, counting up; the final usage chunk has no choices.
    assert [ch["usage"]["completion_tokens"] for ch in chunks] == [0, 1, 2, 3, 4, 5, 5]
    assert chunks[-1]["choices"] == [] and chunks[-1]["system_fingerprint"] == FINGERPRINT
    assert all("system_fingerprint" not in ch for ch in chunks[:-1])  # a usage chunk follows


def test_chat_stream_include_usage_only(c: httpx.Client) -> None:
    ref = split_stream(sse_chunks((FIXTURES / "chat_stream_continuous_usage.sse").read_bytes()), chat=True)
    body = {"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True}
    r = c.post(CHAT, json={**body, "stream_options": {"include_usage": True}})
    ours = split_stream(sse_chunks(r.content), chat=True)
    assert ours["usage"] is not None
    assert_same_shape(ours["usage"], ref["usage"], "usage")
    assert ours["usage"]["usage"]["completion_tokens"] == 3
    assert all("usage" not in ch for ch in [ours["first"], *ours["tokens"]])
    assert "system_fingerprint" not in ours["last"]
    # continuous_usage_stats without include_usage is ignored, as in vLLM.
    r = c.post(CHAT, json={**body, "stream_options": {"continuous_usage_stats": True}})
    assert all("usage" not in ch for ch in sse_chunks(r.content))


def test_completions_stream_matches_recording(c: httpx.Client) -> None:
    ref_chunks = sse_chunks((FIXTURES / "completions_stream.sse").read_bytes())
    body = {
        "model": "tiny",
        "prompt": "one two three",
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = c.post(COMP, json=body)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    chunks = sse_chunks(r.content)
    # vLLM opens a completion stream with its first token, not with an empty chunk.
    assert len(chunks) == len(ref_chunks) == 6  # 5 tokens, usage
    for i, (ours, ref) in enumerate(zip(chunks, ref_chunks, strict=True)):
        assert_same_shape(ours, ref, f"chunk[{i}]")
    assert "".join(ch["choices"][0]["text"] for ch in chunks[:-1]) == expected_text("one two three", 5)
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "total_tokens": 8, "completion_tokens": 5}


def test_completions_stream_without_usage_stamps_fingerprint_on_the_last_token(c: httpx.Client) -> None:
    # vLLM 0.32.0 completion/serving.py: the terminal chunk gets system_fingerprint when no
    # usage chunk follows; continuous usage there has no completion_tokens_details.
    body = {"model": "tiny", "prompt": "one two", "max_tokens": 3, "stream": True}
    chunks = sse_chunks(c.post(COMP, json=body).content)
    assert len(chunks) == 3
    assert [("system_fingerprint" in ch) for ch in chunks] == [False, False, True]
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chunks = sse_chunks(c.post(COMP, json={**body, "stream_options": opts}).content)
    assert list(chunks[0]["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens"]


def test_chat_stream_n2_each_choice_gets_role_and_final_chunk(c: httpx.Client) -> None:
    body = {"model": "tiny", "messages": MSG, "max_tokens": 2, "n": 2, "stream": True}
    chunks = sse_chunks(c.post(CHAT, json=body).content)
    roles = [ch["choices"][0]["index"] for ch in chunks if "role" in ch["choices"][0]["delta"]]
    assert roles == [0, 1]
    finals = [ch for ch in chunks if ch["choices"][0]["finish_reason"] is not None]
    assert sorted(ch["choices"][0]["index"] for ch in finals) == [0, 1]
    assert all(ch["system_fingerprint"] == FINGERPRINT for ch in finals)


# --------------------------------------------------------------------------- errors
ERROR_CASES: list[tuple[str, str, dict[str, Any] | bytes]] = [
    ("err_bad_json.json", CHAT, b"{bad json"),
    ("err_bad_messages.json", CHAT, {"model": "tiny", "messages": "notalist"}),
    ("err_max_tokens.json", CHAT, {"model": "tiny", "messages": MSG, "max_tokens": 100000}),
    (
        "err_stream_options.json",
        CHAT,
        {"model": "tiny", "messages": MSG, "stream_options": {"include_usage": True}},
    ),
    ("err_unknown_model.json", CHAT, {"model": "nope", "messages": MSG}),
    ("err_prompt_too_long.json", COMP, {"model": "tiny", "prompt": " ".join(["word"] * 600)}),
    (
        "err_prompt_too_long.json",
        CHAT,
        {"model": "tiny", "messages": [{"role": "user", "content": "w " * 700}]},
    ),
]


@pytest.mark.parametrize(("name", "path", "body"), ERROR_CASES, ids=[f"{n}-{p}" for n, p, _ in ERROR_CASES])
def test_error_bodies_match_recording_exactly(
    c: httpx.Client, name: str, path: str, body: dict[str, Any] | bytes
) -> None:
    status, ref = fixture_error(name)
    if isinstance(body, bytes):
        r = c.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = c.post(path, json=body)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert_same_shape(r.json(), ref)
    # These messages are deterministic in vLLM (the prompt case always says "at least
    # max_model_len + 1", because vLLM's tokenizer stops there), so they match verbatim.
    assert r.json() == ref


def test_prompt_too_long_wording_pattern(c: httpx.Client) -> None:
    _, ref = fixture_error("err_prompt_too_long.json")
    r = c.post(COMP, json={"model": "tiny", "prompt": list(range(520))})  # token ids: exact count
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == ref["error"]["param"] == "input_tokens"
    assert err["message"] == ref["error"]["message"].replace("at least 513", "520").replace(
        "value=513", "value=520"
    )


def test_max_completion_tokens_error_names_that_parameter(c: httpx.Client) -> None:
    r = c.post(CHAT, json={"model": "tiny", "messages": MSG, "max_completion_tokens": 1000})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_completion_tokens"
    assert err["message"].startswith("max_completion_tokens=1000 cannot be greater than max_model_len=512.")


def test_missing_model_means_the_served_model(c: httpx.Client) -> None:
    # vLLM treats a missing or empty `model` as its served model.
    r = c.post(CHAT, json={"messages": MSG, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_wrong_content_type_is_vllm_400(c: httpx.Client) -> None:
    body = orjson.dumps({"model": "tiny", "messages": MSG})
    r = c.post(CHAT, content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "Unsupported Media Type" in err["message"] and err["type"] == "Bad Request"


# --------------------------------------------------------------------------- probes
def test_health_matches_recording(c: httpx.Client) -> None:
    recorded = (FIXTURES / "health.txt").read_text().split("\n")
    assert recorded[-2:] == ["200", ""]  # empty body, status 200
    r = c.get("/health")
    assert r.status_code == 200 and r.content == "".join(recorded[:-2]).encode()


def test_version_matches_recording(c: httpx.Client) -> None:
    r = c.get("/version")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == fixture_json("version.json")


# --------------------------------------------------------------------------- metrics
REQUIRED_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
}


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_names_types_and_labels_match_recording(c: httpx.Client) -> None:
    c.post(CHAT, json={"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True})
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    ours = _families(r.text)  # raises on any line that does not parse
    ref = _families((FIXTURES / "metrics.txt").read_text())
    for name, kind in REQUIRED_METRICS.items():
        assert ref[name].type == kind, name  # what operators and the gateway rely on...
        assert ours[name].type == kind, name  # ...is there, with the same type
        assert {tuple(sorted(s.labels)) for s in ours[name].samples} <= {
            tuple(sorted(s.labels)) for s in ref[name].samples
        }
    for name, fam in ours.items():
        assert name in ref, f"{name} is not a vLLM 0.32.0 metric"
        assert fam.type == ref[name].type and fam.documentation == ref[name].documentation, name
        ref_labels = {(s.name, tuple(sorted(s.labels))) for s in ref[name].samples}
        for s in fam.samples:
            assert (s.name, tuple(sorted(s.labels))) in ref_labels, s
            assert s.labels["model_name"] == "tiny" and s.labels["engine"] == "0"
    reasons = {s.labels["finished_reason"] for s in ours["vllm:request_success"].samples}
    assert reasons == {s.labels["finished_reason"] for s in ref["vllm:request_success"].samples}
    assert metric_value(r.text, "vllm:time_to_first_token_seconds_count", model_name="tiny") >= 1
    assert metric_value(r.text, "vllm:inter_token_latency_seconds_count", model_name="tiny") >= 1


def test_metric_lines_are_formatted_like_vllm(c: httpx.Client) -> None:
    text = c.get("/metrics").text
    assert text.endswith("\n")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# HELP "):
            assert lines[i + 1].startswith("# TYPE " + line.split()[2] + " ")
        elif not line.startswith("#"):
            family = next(iter(text_string_to_metric_families(line + "\n")))  # each line parses alone
            sample = family.samples[0]
            # prometheus_client (so vLLM) writes labels sorted by name, `le` included.
            names = [part.split("=")[0] for part in line[line.index("{") + 1 : line.index("}")].split(",")]
            assert names == sorted(names), line
            assert sample.name.startswith("vllm:")


# --------------------------------------------------------------------------- knobs
def test_max_tokens_and_output_tokens(c: httpx.Client) -> None:
    r = c.post(CHAT, json={"model": "tiny", "messages": MSG, "max_tokens": 3}).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"
    r = c.post(CHAT, json={"model": "tiny", "messages": MSG}).json()  # --output-tokens default 16
    assert r["usage"]["completion_tokens"] == 16 and r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["message"]["content"] == expected_text(PROMPT, 16)
    r = c.post(CHAT, json={"model": "tiny", "messages": MSG, "max_completion_tokens": 2}).json()
    assert r["usage"]["completion_tokens"] == 2


def test_deterministic_text_from_the_last_message(c: httpx.Client) -> None:
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "red green"}]},
    ]
    r = c.post(CHAT, json={"model": "tiny", "messages": msgs, "max_tokens": 4}).json()
    assert r["choices"][0]["message"]["content"] == expected_text("red green", 4) == " red green red green"
    first = c.post(COMP, json={"model": "tiny", "prompt": "x y z", "max_tokens": 7}).json()
    again = c.post(COMP, json={"model": "tiny", "prompt": "x y z", "max_tokens": 7}).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"] == expected_text("x y z", 7)


def test_received_counts_every_generation_request(c: httpx.Client, csim: Sim) -> None:
    before = csim.stats()["received"]
    c.post(CHAT, json={"model": "tiny", "messages": MSG, "max_tokens": 1})
    c.post(CHAT, content=b"{", headers={"content-type": "application/json"})
    c.get("/v1/models")
    assert csim.stats()["received"] == before + 2


@pytest.fixture(scope="module")
def one_seq() -> Iterator[Sim]:
    s = Sim(None, "--max-num-seqs", "1", "--ttft", "0.01", "--itl", "0.05", "--output-tokens", "20")
    yield s
    s.stop()


def test_max_num_seqs_makes_the_second_request_wait(one_seq: Sim) -> None:
    body = {"model": "tiny", "messages": MSG, "stream": True}
    times: dict[str, float] = {}

    def run(name: str) -> None:
        with httpx.stream("POST", one_seq.url + CHAT, json=body, timeout=20) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 0:
                    times[name + "_first"] = time.monotonic()
        times[name + "_end"] = time.monotonic()

    a = threading.Thread(target=run, args=("a",))
    a.start()
    wait_for(lambda: "a_first" in times, what="first request to start")
    b = threading.Thread(target=run, args=("b",))
    b.start()

    def b_waits() -> bool:
        text = httpx.get(one_seq.url + "/metrics").text
        return (
            metric_value(text, "vllm:num_requests_waiting") == 1
            and metric_value(text, "vllm:num_requests_running") == 1
        )

    wait_for(b_waits, what="vllm:num_requests_waiting 1")
    assert one_seq.stats()["waiting"] == 1
    a.join(20)
    b.join(20)
    # b only started once a's slot was free: a needs 19 more tokens x 0.05 s after its first.
    assert times["b_first"] - times["a_first"] >= 0.9
    text = httpx.get(one_seq.url + "/metrics").text
    assert metric_value(text, "vllm:num_requests_waiting") == 0
    assert metric_value(text, "vllm:num_requests_running") == 0


def test_client_disconnect_is_an_abort(one_seq: Sim) -> None:
    def metrics() -> str:
        return httpx.get(one_seq.url + "/metrics").text

    aborts = metric_value(metrics(), "vllm:request_success_total", finished_reason="abort")
    body = {"model": "tiny", "messages": MSG, "stream": True}
    headers = {"x-request-id": "conformance-abort-1"}
    with httpx.stream("POST", one_seq.url + CHAT, json=body, headers=headers, timeout=10) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # The response is closed mid-stream: the simulator sees the disconnect and aborts.
    wait_for(lambda: "conformance-abort-1" in one_seq.stats()["aborted"], what="abort recorded")
    after = metric_value(metrics(), "vllm:request_success_total", finished_reason="abort")
    assert after == aborts + 1
    assert metric_value(metrics(), "vllm:num_requests_running") == 0


def test_load_time_health_503_then_200() -> None:
    started = time.monotonic()
    s = Sim(None, "--load-time", "3")
    try:
        assert httpx.get(s.url + "/health").status_code == 503
        assert httpx.get(s.url + "/v1/models").status_code == 503
        r = httpx.post(s.url + CHAT, json={"model": "tiny", "messages": MSG})
        assert r.status_code == 503
        wait_for(lambda: httpx.get(s.url + "/health").status_code == 200, timeout=10, what="loaded")
        assert time.monotonic() - started >= 2.9
        assert httpx.get(s.url + "/v1/models").status_code == 200
    finally:
        s.stop()


# --------------------------------------------------------------------------- faults
def fault_headers(fault: str, rid: str | None = None) -> dict[str, str]:
    return {"x-sim-fault": fault, **({"x-request-id": rid} if rid else {})}


STREAM = {"model": "tiny", "messages": MSG, "max_tokens": 8, "stream": True}


@pytest.mark.parametrize(("fault", "status"), [("error", 500), ("status:503", 503), ("status:429", 429)])
def test_fault_status(c: httpx.Client, fault: str, status: int) -> None:
    r = c.post(CHAT, json={"model": "tiny", "messages": MSG}, headers=fault_headers(fault))
    assert r.status_code == status
    err = r.json()["error"]
    assert list(err) == ["message", "type", "param", "code"] and err["code"] == status


def test_fault_drop_cuts_the_connection_mid_stream(csim: Sim) -> None:
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", csim.url + CHAT, json=STREAM, headers=fault_headers("drop:3"), timeout=10) as r,
    ):
        assert r.status_code == 200
        for part in r.iter_raw():
            received += part
    events = [e for e in received.split(b"\n\n") if e]
    assert len(events) == 4  # the role chunk and three tokens, then the connection is cut
    assert b"[DONE]" not in received and b'"finish_reason":"length"' not in received


def test_fault_error_event_then_done(c: httpx.Client) -> None:
    r = c.post(CHAT, json=STREAM, headers=fault_headers("error-event:2"))
    assert r.status_code == 200
    payloads = sse_payloads(r.content)
    assert len(payloads) == 1 + 2 + 1  # role, two tokens, the error event
    assert payloads[-1].startswith(b'{"error": ')  # vLLM's json.dumps spacing
    err = orjson.loads(payloads[-1])["error"]
    assert list(err) == ["message", "type", "param", "code"]
    assert err["type"] == "InternalServerError" and err["code"] == 500


def test_fault_hang_until_the_client_gives_up(csim: Sim) -> None:
    timeout = httpx.Timeout(5, read=0.5)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            csim.url + CHAT,
            json={"model": "tiny", "messages": MSG},
            headers=fault_headers("hang", "conformance-hang-1"),
            timeout=timeout,
        )
    assert time.monotonic() - started >= 0.45
    wait_for(lambda: "conformance-hang-1" in csim.stats()["aborted"], what="hang recorded as abort")


def test_fault_hang_after_n_tokens(csim: Sim) -> None:
    received = b""
    timeout = httpx.Timeout(5, read=0.5)
    headers = fault_headers("hang-after:2", "conformance-hang-2")
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream("POST", csim.url + CHAT, json=STREAM, headers=headers, timeout=timeout) as r,
    ):
        for part in r.iter_raw():
            received += part
    assert len([e for e in received.split(b"\n\n") if e]) == 3  # role + two tokens
    wait_for(lambda: "conformance-hang-2" in csim.stats()["aborted"], what="abort recorded")


def test_fault_slow_start(csim: Sim) -> None:
    started = time.monotonic()
    with httpx.stream(
        "POST", csim.url + CHAT, json=STREAM, headers=fault_headers("slow-start:0.6"), timeout=10
    ) as r:
        lines = r.iter_lines()
        first = next(lines)
        waited = time.monotonic() - started
        rest = [line for line in lines if line]
    assert first.startswith("data: {") and waited >= 0.55
    assert rest[-1] == "data: [DONE]"
