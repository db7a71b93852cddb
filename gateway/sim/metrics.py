"""The simulator's /metrics: a subset of vLLM's metric names, rendered by hand (cheap)."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.buckets, v)] += 1
        self.total += v
        self.n += 1

    def render(self, name: str, labels: dict[str, str]) -> list[str]:
        lines = []
        acc = 0
        for le, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            lines.append(f"{name}_bucket{{{_labels(labels, le=str(le))}}} {float(acc)}")
        lines.append(f"{name}_bucket{{{_labels(labels, le='+Inf')}}} {float(self.n)}")
        lines.append(f"{name}_count{{{_labels(labels)}}} {float(self.n)}")
        lines.append(f"{name}_sum{{{_labels(labels)}}} {self.total}")
        return lines


def _labels(base: dict[str, str], **more: str) -> str:
    # prometheus_client (and so vLLM) renders labels sorted by name: engine, finished_reason,
    # le, model_name.
    merged = {**base, **more}
    return ",".join(f'{k}="{merged[k]}"' for k in sorted(merged))


@dataclass
class SimMetrics:
    model: str
    max_num_seqs: int
    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))

    def render(self) -> bytes:
        base = {"engine": "0", "model_name": self.model}
        lab = _labels(base)
        kv = min(1.0, self.running / max(1, self.max_num_seqs))
        out: list[str] = []

        def family(name: str, kind: str, help_: str, lines: list[str]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

        family(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            [f"vllm:num_requests_running{{{lab}}} {float(self.running)}"],
        )
        family(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [f"vllm:num_requests_waiting{{{lab}}} {float(self.waiting)}"],
        )
        family(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            [f"vllm:kv_cache_usage_perc{{{lab}}} {kv}"],
        )
        family(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            [f"vllm:prompt_tokens_total{{{lab}}} {float(self.prompt_tokens)}"],
        )
        family(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            [f"vllm:generation_tokens_total{{{lab}}} {float(self.generation_tokens)}"],
        )
        family(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            [
                f"vllm:request_success_total{{{_labels(base, finished_reason=r)}}} {float(c)}"
                for r, c in self.finished.items()
            ],
        )
        family(
            "vllm:time_to_first_token_seconds",
            "histogram",
            "Histogram of time to first token in seconds.",
            self.ttft.render("vllm:time_to_first_token_seconds", base),
        )
        family(
            "vllm:inter_token_latency_seconds",
            "histogram",
            "Histogram of inter-token latency in seconds.",
            self.itl.render("vllm:inter_token_latency_seconds", base),
        )
        family(
            "vllm:e2e_request_latency_seconds",
            "histogram",
            "Histogram of e2e request latency in seconds.",
            self.e2e.render("vllm:e2e_request_latency_seconds", base),
        )
        return ("\n".join(out) + "\n").encode()
