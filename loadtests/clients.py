"""Upstream HTTP clients in isolation: client-side CPU per streamed chunk, aiohttp vs httpx.

Run one client per process, so ``time.process_time()`` is that client's CPU
and nothing else's. The process streams chat completions from the simulator
with ``max_tokens`` = LONG, then = SHORT, reading every chunk and nothing
more (as the gateway's relay does), in slices long, short, short, long, and
prints one JSON line:

    python -m loadtests.clients --client aiohttp --url http://127.0.0.1:8000

CPU per chunk is the marginal cost: (CPU of the long batch - CPU of the short
batch) / (chunks of the long batch - chunks of the short batch), so the fixed
per-stream cost (connection reuse, request, headers) cancels out. A client may
get two SSE events in one read; CPU per token event divides by the token
difference instead (streams x (LONG - SHORT)), the same for every client.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import aiohttp
import httpx
import orjson
import uvloop

from loadtests.bench import chat_body

ClientName = Literal["aiohttp", "httpx"]
StreamOnce = Callable[[bytes], Awaitable[int]]  # body -> chunks read


async def _batch(stream_once: StreamOnce, body: bytes, streams: int, concurrency: int) -> tuple[float, int]:
    """Run ``streams`` streams, ``concurrency`` at a time; return (CPU seconds, chunks read)."""
    left = streams
    chunks = 0

    async def worker() -> None:
        nonlocal left, chunks
        while left > 0:
            left -= 1
            n = await stream_once(body)
            chunks += n  # not `chunks += await ...`: that reads `chunks` before awaiting

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - cpu, chunks


async def _measure(
    stream_once: StreamOnce, streams: int, concurrency: int, long: int, short: int
) -> dict[str, Any]:
    await _batch(stream_once, chat_body(short, True), concurrency * 2, concurrency)  # warm up
    cpu = {long: 0.0, short: 0.0}
    chunks = {long: 0, short: 0}
    wall = time.perf_counter()
    # long, short, short, long: drift in the machine's load weighs on both alike
    for tokens in (long, short, short, long):
        c, n = await _batch(stream_once, chat_body(tokens, True), streams // 2, concurrency)
        cpu[tokens] += c
        chunks[tokens] += n
    wall = time.perf_counter() - wall
    n_streams = streams // 2 * 2
    per_chunk = (cpu[long] - cpu[short]) / max(1, chunks[long] - chunks[short])
    return {
        "streams": n_streams,
        "concurrency": concurrency,
        "max_tokens": [long, short],
        "cpu_s": [cpu[long], cpu[short]],
        "chunks": [chunks[long], chunks[short]],
        "wall_s": wall,
        "cpu_us_per_chunk": per_chunk * 1e6,  # per read that returned bytes
        # per token event: the same denominator for every client, however it coalesces reads
        "cpu_us_per_token_event": (cpu[long] - cpu[short]) / (n_streams * (long - short)) * 1e6,
        "cpu_us_per_stream": cpu[long] / n_streams * 1e6,
        "cpu_us_per_stream_fixed": (cpu[long] - per_chunk * chunks[long]) / n_streams * 1e6,
    }


async def run_aiohttp(url: str, streams: int, concurrency: int, long: int, short: int) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        target = url + "/v1/chat/completions"
        headers = {"Content-Type": "application/json"}

        async def stream_once(body: bytes) -> int:
            n = 0
            async with session.post(target, data=body, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"aiohttp: status {resp.status}")
                while await resp.content.readany():
                    n += 1
            return n

        return await _measure(stream_once, streams, concurrency, long, short)


async def run_httpx(url: str, streams: int, concurrency: int, long: int, short: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        target = url + "/v1/chat/completions"
        headers = {"Content-Type": "application/json"}

        async def stream_once(body: bytes) -> int:
            n = 0
            async with client.stream("POST", target, content=body, headers=headers) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"httpx: status {resp.status_code}")
                async for _ in resp.aiter_raw():
                    n += 1
            return n

        return await _measure(stream_once, streams, concurrency, long, short)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.clients", description=__doc__)
    p.add_argument("--client", choices=["aiohttp", "httpx"], required=True)
    p.add_argument("--url", required=True, help="simulator base URL")
    p.add_argument("--streams", type=int, default=200, help="streams of each length")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--long", type=int, default=32, help="max_tokens of the long batch")
    p.add_argument("--short", type=int, default=8, help="max_tokens of the short batch")
    args = p.parse_args(argv)
    run = run_aiohttp if args.client == "aiohttp" else run_httpx
    result = uvloop.run(run(args.url, args.streams, args.concurrency, args.long, args.short))
    result["client"] = args.client
    result["version"] = aiohttp.__version__ if args.client == "aiohttp" else httpx.__version__
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
