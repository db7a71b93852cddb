"""Async jobs under load (``python -m loadtests.jobs``): a big batch, and interactive latency beside it.

Starts its own simulator and gateway (jobs on, Redis at ``--redis``, a fresh key prefix) on free
127.0.0.1 ports and stops them by PID at the end. Parts:

    batch        a ``--lines``-line batch (default 10,000) through the Batch API: wall time, lines/s,
                 the mean number of lines running (sampled from the simulator) against the pool's
                 capacity (``max_in_flight``), and the gateway's RSS sampled every 0.5 s (start,
                 peak, end: flat memory means no line or result is held beyond the ones running).
    interactive  the same open-loop interactive load (plain chat requests) twice, for
                 ``--seconds`` each: alone, then while a batch keeps the pool full. Reports p50/p90/p99
                 latency of both and the p50 change (the issue's bound: within 10 %).
    fair         fair shares: team A's ``--lines``-line batch runs, then team B submits a 100-line
                 batch; reports how long B's took (submit to completed) and how many of A's lines
                 were still waiting then (first come, first served, B would have waited for them all).

Results: loadtests/results/jobs-*.json and a Markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import uvloop
import yaml

from loadtests.bench import ROOT, Child, free_port, machine, open_loop, percentile, tree_cpu, wait_http
from loadtests.capacity import tree_rss

RESULTS = ROOT / "loadtests" / "results"
KEY = "sk-loadtest-" + "k" * 24  # team "a"
KEY_B = "sk-loadtest-b-" + "k" * 22  # team "b"


def log(msg: str) -> None:
    print(f"[jobs] {msg}", file=sys.stderr, flush=True)


class Stack:
    def __init__(self, scratch: Path, redis_url: str, capacity: int, sim_flags: Sequence[str]) -> None:
        import hashlib

        py = sys.executable
        self.children: list[Child] = []
        sim_port, gw_port = free_port(), free_port()
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        self.url = f"http://127.0.0.1:{gw_port}"
        self.prefix = f"loadtest:jobs:{secrets.token_hex(4)}:"
        cfg = {
            "backends": [{"url": self.sim_url, "max_in_flight": capacity}],
            "admission": {"max_queue": 100_000},
            "auth": {
                "api_keys": [
                    {"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "subject": "lt", "team": "a"},
                    {"sha256": hashlib.sha256(KEY_B.encode()).hexdigest(), "subject": "lt-b", "team": "b"},
                ]
            },
            "logging": {"access_log": False},
            "jobs": {
                "enabled": True,
                "queue": redis_url,
                "key_prefix": self.prefix,
                "files": f"file://{scratch / 'files'}",
                "concurrency": capacity,
            },
        }
        scratch.mkdir(parents=True, exist_ok=True)
        config = scratch / "gateway.yaml"
        config.write_text(yaml.safe_dump(cfg))
        try:
            self.sim = Child("sim", [py, "-m", "gateway", "sim", "--port", str(sim_port), *sim_flags])
            self.children.append(self.sim)
            wait_http(self.sim_url + "/version", self.sim)
            self.gw = Child(
                "gateway", [py, "-m", "gateway", "serve", "--config", str(config), "--port", str(gw_port)]
            )
            self.children.append(self.gw)
            wait_http(self.url + "/ready", self.gw, timeout=60)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def batch_lines(n: int, max_tokens: int) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": f"line {i}"}],
                    "max_tokens": max_tokens,
                },
            }
        )
        + b"\n"
        for i in range(n)
    )


def start_batch(client: openai.OpenAI, n: int, max_tokens: int) -> str:
    f = client.files.create(file=("lines.jsonl", batch_lines(n, max_tokens)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    return b.id


async def closed_loop(url: str, concurrency: int, n: int, max_tokens: int) -> float:
    """Requests/s of ``n`` synchronous requests sent by ``concurrency`` clients, each sending its
    next one as soon as it has an answer: the pool's capacity as interactive traffic sees it."""
    body = orjson.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "line"}], "max_tokens": max_tokens}
    )
    left = n
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        connector=aiohttp.TCPConnector(limit=0),
    ) as session:

        async def client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url + "/v1/chat/completions", data=body) as resp:
                    await resp.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return n / (time.perf_counter() - t0)


def run_batch(stack: Stack, n: int, max_tokens: int, capacity: int) -> dict[str, Any]:
    reference = uvloop.run(closed_loop(stack.url, capacity, min(n, 3000), max_tokens))
    log(f"synchronous requests at {capacity} concurrent: {reference:.1f}/s")
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=2)
    rss_start = tree_rss(stack.gw.pid)["total"]
    cpu0 = tree_cpu(stack.gw.pid).exact
    t0 = time.perf_counter()
    bid = start_batch(client, n, max_tokens)
    rss: list[int] = []
    running: list[int] = []
    status = "validating"
    while status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.5)
        rss.append(tree_rss(stack.gw.pid)["total"])
        running.append(int(httpx.get(stack.sim_url + "/sim/stats", timeout=5).json()["running"]))
        status = client.batches.retrieve(bid).status
    wall = time.perf_counter() - t0
    cpu = tree_cpu(stack.gw.pid).exact - cpu0
    b = client.batches.retrieve(bid)
    counts = b.request_counts
    out = {
        "lines": n,
        "status": status,
        "completed": counts.completed if counts else None,
        "failed": counts.failed if counts else None,
        "wall_s": round(wall, 1),
        "lines_per_s": round(n / wall, 1),
        "capacity": capacity,
        "sync_reference_per_s": round(reference, 1),
        "mean_running": round(sum(running) / max(1, len(running)), 1),
        "gateway_cpu_ms_per_line": round(cpu / n * 1000, 2),
        "gateway_cpu_share": round(cpu / wall, 2),
        "rss_kb": {"start": rss_start, "peak": max(rss or [rss_start]), "end": rss[-1] if rss else rss_start},
    }
    log(f"batch: {out}")
    return out


async def interactive(url: str, rate: float, seconds: float, max_tokens: int) -> dict[str, Any]:
    body = orjson.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    )
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        connector=aiohttp.TCPConnector(limit=0),
    ) as session:
        samples = await open_loop(session, url + "/v1/chat/completions", body, False, rate, seconds)
    ok = [s.total for s in samples if s.ok]
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "p50_ms": round(percentile(ok, 50) * 1000, 1),
        "p90_ms": round(percentile(ok, 90) * 1000, 1),
        "p99_ms": round(percentile(ok, 99) * 1000, 1),
    }


def run_interactive(
    stack: Stack, rate: float, seconds: float, max_tokens: int, batch_tokens: int
) -> dict[str, Any]:
    alone = uvloop.run(interactive(stack.url, rate, seconds, max_tokens))
    log(f"interactive alone: {alone}")
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=2)
    lines = int(rate * seconds * 20) + 1000  # more than the run can finish: the pool stays full
    bid = start_batch(client, lines, batch_tokens)
    deadline = time.monotonic() + 60
    while client.batches.retrieve(bid).status != "in_progress" and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # the workers fill the pool
    beside = uvloop.run(interactive(stack.url, rate, seconds, max_tokens))
    log(f"interactive beside a batch: {beside}")
    done = client.batches.retrieve(bid).request_counts
    client.batches.cancel(bid)
    change = (beside["p50_ms"] - alone["p50_ms"]) / alone["p50_ms"] * 100 if alone["p50_ms"] else None
    return {
        "rate": rate,
        "seconds": seconds,
        "alone": alone,
        "beside_batch": beside,
        "batch_lines_done_meanwhile": done.completed if done else None,
        "p50_change_pct": None if change is None else round(change, 1),
    }


def run_fair(stack: Stack, n: int, max_tokens: int) -> dict[str, Any]:
    a = openai.OpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=2)
    b = openai.OpenAI(base_url=stack.url + "/v1", api_key=KEY_B, max_retries=2)
    big = start_batch(a, n, max_tokens)
    deadline = time.monotonic() + 120
    while a.batches.retrieve(big).status != "in_progress" and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # the workers fill the pool with team a's lines
    t0 = time.perf_counter()
    small = start_batch(b, 100, max_tokens)
    while b.batches.retrieve(small).status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.1)
    took = time.perf_counter() - t0
    seen = a.batches.retrieve(big).request_counts
    done = seen.completed + seen.failed if seen else 0
    a.batches.cancel(big)
    out = {"big_lines": n, "small_lines": 100, "small_s": round(took, 2), "big_lines_left": n - done}
    log(f"fair: {out}")
    return out


def render(report: dict[str, Any]) -> str:
    out = [f"# Jobs load test ({report['when']})", ""]
    b = report.get("batch")
    if b:
        r = b["rss_kb"]
        out += [
            f"Batch of {b['lines']:,} lines: {b['status']} ({b['completed']} completed, "
            f"{b['failed']} failed) in "
            f"{b['wall_s']} s = {b['lines_per_s']} lines/s (synchronous requests with {b['capacity']} "
            f"clients back to back: {b['sync_reference_per_s']}/s); {b['mean_running']} lines running "
            "on average "
            f"for a pool capacity of {b['capacity']}; gateway CPU {b['gateway_cpu_ms_per_line']} ms per line "
            f"({b['gateway_cpu_share']} of a core); gateway RSS {r['start'] / 1024:.0f} MiB at start, "
            f"{r['peak'] / 1024:.0f} MiB peak, {r['end'] / 1024:.0f} MiB at the end.",
            "",
        ]
    i = report.get("interactive")
    if i:
        a, s = i["alone"], i["beside_batch"]
        out += [
            f"Interactive at {i['rate']}/s for {i['seconds']} s, alone vs beside a batch filling the pool "
            f"({i['batch_lines_done_meanwhile']} batch lines done meanwhile):",
            "",
            "| | p50 ms | p90 ms | p99 ms | errors |",
            "|---|---|---|---|---|",
            f"| alone | {a['p50_ms']} | {a['p90_ms']} | {a['p99_ms']} | {a['errors']} |",
            f"| beside a batch | {s['p50_ms']} | {s['p90_ms']} | {s['p99_ms']} | {s['errors']} |",
            "",
            f"p50 change: {i['p50_change_pct']} %",
        ]
    f = report.get("fair")
    if f:
        out += [
            "",
            f"Fair shares: team b's {f['small_lines']}-line batch, submitted while team a's "
            f"{f['big_lines']:,}-line batch filled the pool, completed in {f['small_s']} s, with "
            f"{f['big_lines_left']:,} of team a's lines still to run (queued first, all of them would "
            "have run before it, first come first served).",
        ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parts_help = "batch, interactive, fair (default: the first two)"
    p.add_argument("--parts", default="batch,interactive", help=parts_help)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis for the job queue")
    p.add_argument("--lines", type=int, default=10_000, help="lines of the big batch")
    p.add_argument("--capacity", type=int, default=32, help="the replica's max_in_flight = jobs.concurrency")
    p.add_argument("--rate", type=float, default=20, help="interactive requests per second")
    p.add_argument("--seconds", type=float, default=20, help="seconds of each interactive phase")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per interactive request")
    p.add_argument("--batch-tokens", type=int, default=16, help="tokens per batch line")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    # A simulator whose sequences slow each other down is what makes the comparison honest; the
    # simulator runs every admitted sequence at full speed, so the effect measured is admission's.
    sim_flags = ["--ttft", "0.02", "--itl", "0.005", "--max-num-seqs", str(args.capacity)]
    report: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="jobs-load-") as tmp:
        if "batch" in parts:
            stack = Stack(Path(tmp) / "a", args.redis, args.capacity, sim_flags)
            try:
                report["batch"] = run_batch(stack, args.lines, args.batch_tokens, args.capacity)
            finally:
                stack.stop()
        if "interactive" in parts:
            stack = Stack(Path(tmp) / "b", args.redis, args.capacity, sim_flags)
            try:
                report["interactive"] = run_interactive(
                    stack, args.rate, args.seconds, args.max_tokens, args.batch_tokens
                )
            finally:
                stack.stop()
        if "fair" in parts:
            stack = Stack(Path(tmp) / "c", args.redis, args.capacity, sim_flags)
            try:
                report["fair"] = run_fair(stack, args.lines, args.batch_tokens)
            finally:
                stack.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"jobs-{stamp}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
