"""Logs are JSON with the request id and no prompt text; /metrics carries the request series."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import Gateway, Sim

SECRET_PROMPT = "zebra-unicorn-secret-prompt"


def test_logs_are_json_carry_request_id_and_no_prompt_text(sim: Sim) -> None:
    gw = Gateway([sim.url])
    try:
        c = openai.OpenAI(base_url=gw.v1, api_key="sk-do-not-log", max_retries=0)
        msgs = [{"role": "user", "content": SECRET_PROMPT}]
        r = c.chat.completions.with_raw_response.create(model="tiny", messages=msgs, max_tokens=3)  # type: ignore[arg-type]
        rid = r.headers["x-request-id"]
        list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, stream=True))  # type: ignore[arg-type]
        audit = gw.wait_logs(lambda r: r.get("event") == "request", count=2)
    finally:
        gw.stop()
    lines = gw.log_lines()
    records = [orjson.loads(line) for line in lines]  # every line is JSON, uvicorn's included
    assert any(r.get("logger") == "uvicorn.error" for r in records)
    assert len(audit) == 2
    plain = next(r for r in audit if r["request_id"] == rid)
    assert plain["status"] == 200
    assert plain["model"] == "tiny"
    assert plain["completion_tokens"] == 3
    assert plain["prompt_tokens"] > 0
    assert plain["duration_ms"] > 0
    streamed = next(r for r in audit if r["stream"])
    assert streamed["completion_tokens"] == 3
    assert streamed["ttft_ms"] > 0
    text = "\n".join(lines)
    assert SECRET_PROMPT not in text
    assert "sk-do-not-log" not in text
    assert " one two" not in text  # no completion text either


def test_metrics_count_requests_tokens_and_latency(gateway: Gateway) -> None:
    c = openai.OpenAI(base_url=gateway.v1, api_key="x", max_retries=0)
    c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a b"}], max_tokens=2)  # type: ignore[arg-type]
    list(
        c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "a b"}], max_tokens=2, stream=True
        )
    )  # type: ignore[arg-type]
    httpx.post(
        gateway.v1 + "/chat/completions", content=b"{bad json", headers={"content-type": "application/json"}
    )

    def scrape() -> tuple[dict[str, Any], dict[tuple[str, ...], float]]:
        body = httpx.get(gateway.url + "/metrics").text
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        reqs = {
            (s.labels["endpoint"], s.labels["model"], s.labels["status"], s.labels["stream"]): s.value
            for s in fams["gateway_requests"].samples
            if s.name == "gateway_requests_total"
        }
        return fams, reqs

    # A stream is accounted just after its last byte went out: poll until it is.
    deadline = time.monotonic() + 5
    fams, reqs = scrape()
    while ("chat", "tiny", "200", "true") not in reqs and time.monotonic() < deadline:
        time.sleep(0.02)
        fams, reqs = scrape()
    assert reqs[("chat", "tiny", "200", "false")] == 1  # this module's gateway: only these
    assert reqs[("chat", "tiny", "200", "true")] == 1
    assert reqs[("chat", "unknown", "400", "false")] == 1
    tokens = {
        s.labels["model"]: s.value
        for s in fams["gateway_completion_tokens"].samples
        if s.name.endswith("_total")
    }
    assert tokens["tiny"] == 4
    ttft = [s for s in fams["gateway_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft
    assert ttft[0].value == 1
    assert "gateway_request_duration_seconds" in fams
    assert "gateway_requests_in_flight" in fams
    up = {s.labels["backend"]: s.value for s in fams["gateway_backend_up"].samples}
    assert list(up.values()) == [1.0]
    errors = {
        s.labels["reason"]: s.value for s in fams["gateway_errors"].samples if s.name.endswith("_total")
    }
    assert errors["validation"] == 1


def test_two_workers_serve(sim: Sim) -> None:
    gw = Gateway([sim.url], "--workers", "2")
    try:
        c = openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0)
        for _ in range(4):
            r = c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "w"}], max_tokens=1
            )  # type: ignore[arg-type]
            assert r.choices[0].message.content == " w"
    finally:
        gw.stop()


def test_content_logging_is_per_team_and_redacted(sim: Sim, tmp_path: Path) -> None:
    import hashlib

    key = lambda k: hashlib.sha256(k.encode()).hexdigest()  # noqa: E731
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        f"""
auth:
  api_keys:
    - {{sha256: {key("sk-audit-team-key")}, subject: auditor, team: audited}}
    - {{sha256: {key("sk-quiet-team-key")}, subject: quiet, team: quiet}}
teams:
  audited: {{log_content: true}}
  quiet: {{}}
"""
    )
    gw = Gateway([sim.url], config=cfg)
    secret = "sk-live-abcdefghijklmnop1234"
    try:
        for api_key, word in (("sk-audit-team-key", "pelican"), ("sk-quiet-team-key", "albatross")):
            c = openai.OpenAI(base_url=gw.v1, api_key=api_key, max_retries=0)
            msgs = [{"role": "user", "content": f"{word} my key is {secret}"}]
            c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)  # type: ignore[arg-type]
            list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, stream=True))  # type: ignore[arg-type]
        audit = gw.wait_logs(lambda r: r.get("event") == "request", count=4)
    finally:
        gw.stop()
    audited = [a for a in audit if a["team"] == "audited"]
    quiet = [a for a in audit if a["team"] == "quiet"]
    assert len(audited) == 2
    assert len(quiet) == 2
    for a in audited:
        assert "pelican my key is [REDACTED]" in a["prompt"]
        assert a["completion"] == " pelican my"  # plain and streamed alike
    assert all("prompt" not in a and "completion" not in a for a in quiet)
    text = "\n".join(gw.log_lines())
    assert secret not in text
    assert "albatross" not in text


def test_overhead_histogram_agrees_with_an_outside_measurement() -> None:
    """gateway_overhead_seconds (inside view) vs gateway-minus-direct latency (outside view).

    Not a speed target: a consistency check that the histogram measures the gateway's own time,
    i.e. it is positive and not larger than what a client sees the hop add (plus slack for noise).
    """
    sim = Sim(None, "--ttft", "0.01", "--itl", "0")
    gw = Gateway([sim.url])
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    try:
        with httpx.Client() as h:
            for url in (sim.url, gw.url):  # warm both paths
                for _ in range(20):
                    h.post(url + "/v1/chat/completions", json=body)
            base = httpx.get(gw.url + "/metrics").text
            timings: dict[str, list[float]] = {sim.url: [], gw.url: []}
            for _ in range(150):
                for url in (sim.url, gw.url):
                    t = time.perf_counter()
                    h.post(url + "/v1/chat/completions", json=body)
                    timings[url].append(time.perf_counter() - t)
            after = httpx.get(gw.url + "/metrics").text
    finally:
        gw.stop()
        sim.stop()

    def overhead(text: str) -> tuple[float, float]:
        fam = {f.name: f for f in text_string_to_metric_families(text)}["gateway_overhead_seconds"]
        total = sum(s.value for s in fam.samples if s.name.endswith("_sum") and s.labels["stream"] == "false")
        count = sum(
            s.value for s in fam.samples if s.name.endswith("_count") and s.labels["stream"] == "false"
        )
        return total, count

    (s0, c0), (s1, c1) = overhead(base), overhead(after)
    assert c1 - c0 == 150
    inside = (s1 - s0) / (c1 - c0)
    outside = sum(timings[gw.url]) / 150 - sum(timings[sim.url]) / 150
    print(
        f"\noverhead histogram mean {inside * 1000:.3f} ms; client-seen added latency {outside * 1000:.3f} ms"
    )
    assert 0 < inside < max(outside, 0) + 0.005
