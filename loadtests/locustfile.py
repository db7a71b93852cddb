"""Locust load test for your own deployment of the gateway (not used by `make bench`).

    pip install locust
    GATEWAY_JWT=$(llm-gateway token --config gw.yaml --sub loadtest --team search --tier batch) \\
    locust -f loadtests/locustfile.py --host https://gateway.example.com \\
        --users 50 --spawn-rate 5 --run-time 10m --headless

Environment: GATEWAY_JWT (or GATEWAY_API_KEY) for auth, LOAD_MODEL (default `default`),
LOAD_STREAM_SHARE (fraction of streamed requests, default 0.7).

Prompt and output lengths follow log-normal distributions (most requests short, a long
tail), as chat traffic does. Time to first token is reported as its own Locust entry
("TTFT /v1/chat/completions"), so its percentiles sit next to the request latencies.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from locust import HttpUser, between, task

MODEL = os.environ.get("LOAD_MODEL", "default")
STREAM_SHARE = float(os.environ.get("LOAD_STREAM_SHARE", "0.7"))
TOKEN = os.environ.get("GATEWAY_JWT") or os.environ.get("GATEWAY_API_KEY", "")
WORDS = [
    "the",
    "gateway",
    "routes",
    "requests",
    "across",
    "replicas",
    "and",
    "streams",
    "tokens",
    "back",
    "while",
    "the",
    "queue",
    "absorbs",
    "bursts",
    "so",
    "that",
    "a",
    "spike",
    "becomes",
    "latency",
    "rather",
    "than",
    "errors",
    "for",
    "every",
    "team",
    "sharing",
    "the",
    "GPU",
]


def _prompt() -> str:
    n = min(2000, max(5, int(random.lognormvariate(4.0, 1.0))))  # median ~55 words
    return " ".join(random.choice(WORDS) for _ in range(n))


def _max_tokens() -> int:
    return min(1024, max(8, int(random.lognormvariate(4.5, 0.8))))  # median ~90 tokens


class ChatUser(HttpUser):
    wait_time = between(0.5, 3.0)

    def on_start(self) -> None:
        if TOKEN:
            self.client.headers["Authorization"] = f"Bearer {TOKEN}"

    def _body(self, stream: bool) -> dict[str, Any]:
        return {
            "model": MODEL,
            "messages": [{"role": "user", "content": _prompt()}],
            "max_tokens": _max_tokens(),
            "stream": stream,
        }

    @task
    def chat(self) -> None:
        if random.random() >= STREAM_SHARE:
            self.client.post("/v1/chat/completions", json=self._body(False), name="/v1/chat/completions")
            return
        started = time.perf_counter()
        first: float | None = None
        with self.client.post(
            "/v1/chat/completions",
            json=self._body(True),
            stream=True,
            catch_response=True,
            name="/v1/chat/completions (stream)",
        ) as resp:
            ok = False
            for line in resp.iter_lines():
                if not line or not line.startswith(b"data: "):
                    continue
                if first is None:
                    first = time.perf_counter()
                if line == b"data: [DONE]":
                    ok = True
                elif b'"error"' in line and json.loads(line[6:]).get("error"):
                    resp.failure(f"stream error: {line[:200]!r}")
                    return
            if not ok:
                resp.failure("stream ended without [DONE]")
                return
            resp.success()
        if first is not None:
            self.environment.events.request.fire(
                request_type="TTFT",
                name="/v1/chat/completions",
                response_time=(first - started) * 1000,
                response_length=0,
                exception=None,
                context={},
            )
