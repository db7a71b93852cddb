"""The simulator's knobs: command-line flags and the runtime-changeable ``SimConfig``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields


@dataclass
class SimConfig:
    models: list[str] = field(default_factory=lambda: ["tiny"])
    embedding_models: list[str] = field(default_factory=list)
    max_model_len: int = 512
    ttft: float = 0.05  # seconds to the first token (prefill)
    itl: float = 0.01  # seconds between tokens
    output_tokens: int = 16  # tokens generated when max_tokens allows
    max_num_seqs: int = 256  # sequences generated at once; the rest wait
    load_time: float = 0.0  # seconds after start during which /health is 503
    healthy: bool = True  # /health answers 200 (after loading)
    error_rate: float = 0.0  # fraction of generation requests answered 500
    fault: str = ""  # a fault applied to every request (same syntax as the x-sim-fault header)
    api_key: str = ""  # when set, /v1/* require `Authorization: Bearer <key>` (vLLM's --api-key)
    # SSE framing of streams: "vllm" (data: {json}\n\n), or another OpenAI-compatible server's:
    # "crlf", "cr" (line endings), "bare" (LF, `data:` without its space, comments, event/id lines)
    sse_framing: str = "vllm"
    seed: int = 0
    weights: str = ""  # a version tag of the served weights, shown in /v1/models `root`

    def update(self, changes: dict[str, object]) -> list[str]:
        """Apply runtime changes from POST /sim/control; return unknown keys."""
        names = {f.name: f for f in fields(self)}
        unknown = []
        for key, value in changes.items():
            if key not in names:
                unknown.append(key)
                continue
            current = getattr(self, key)
            setattr(self, key, type(current)(value) if not isinstance(current, list) else value)
        return unknown


def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=int, default=8000, help="listen port")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help="served model name (repeatable; default: tiny)",
    )
    p.add_argument(
        "--embedding-model",
        dest="embedding_models",
        action="append",
        metavar="NAME",
        default=[],
        help="serve this name as an embedding model on /v1/embeddings (repeatable)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=512,
        help="context length in tokens: a longer prompt or max_tokens is a 400, as from vLLM",
    )
    p.add_argument("--ttft", type=float, default=0.05, help="seconds to first token")
    p.add_argument("--itl", type=float, default=0.01, help="seconds between tokens")
    p.add_argument("--output-tokens", type=int, default=16, help="tokens per answer (max_tokens caps it)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="concurrent sequences; the rest wait")
    p.add_argument("--load-time", type=float, default=0.0, help="seconds of model loading at start")
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered 500")
    p.add_argument(
        "--fault",
        default="",
        help="fault for every request: error, status:CODE, drop:N, error-event:N, hang, "
        "hang-after:N, slow-start:SECONDS, die, usage:PROMPT,COMPLETION (report those counts) "
        "(default: none)",
    )
    p.add_argument(
        "--api-key", default="", help="require this bearer key on /v1/* (like vLLM; default: none)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the --error-rate draws")
    p.add_argument(
        "--sse-framing",
        default="vllm",
        choices=["vllm", "crlf", "cr", "bare"],
        help="SSE framing of streams (vllm's, or another OpenAI-compatible server's)",
    )


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        models=args.models or ["tiny"],
        embedding_models=args.embedding_models,
        max_model_len=args.max_model_len,
        ttft=args.ttft,
        itl=args.itl,
        output_tokens=args.output_tokens,
        max_num_seqs=args.max_num_seqs,
        load_time=args.load_time,
        error_rate=args.error_rate,
        fault=args.fault,
        api_key=args.api_key,
        seed=args.seed,
        sse_framing=args.sse_framing,
    )
