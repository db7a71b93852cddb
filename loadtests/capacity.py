"""Capacity, memory and soak of the gateway against the vLLM simulator (``python -m loadtests.capacity``).

Starts its own simulator and gateway (from ``--gateway-src``, e.g. a ``git archive`` snapshot) on free
127.0.0.1 ports, drives them from an aiohttp client on uvloop in this process, and stops every process
it started by PID. Parts (``--parts``, default all):

    curve   open-loop throughput steps (fixed arrival rate) straight to the simulator (the ceiling of
            the setup: client and simulator share the machine's cores), then through the gateway with
            1 and with 2 workers; achieved rate, errors, p50/p99 latency and each process tree's CPU.
            A curve stops after the first step that is not sustainable (errors >= 1 % or p99 >= 1 s).
    memory  RSS of the gateway's process tree before and after opening N concurrent streams that wait
            for their first token (simulator --ttft 60), per stream, then after closing them all.
    soak    half of the sustainable 1-worker rate for --soak-seconds, RSS sampled every 10 s.

The simulator and the gateway get a high ``max_num_seqs`` / ``max_in_flight`` / ``max_queue`` so that
the setup's own queues do not cap the load. Results: loadtests/results/capacity-*.json and a Markdown
summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from loadtests.bench import (
    ROOT,
    Child,
    Sample,
    auth_config,
    chat_body,
    free_port,
    git,
    machine,
    one_request,
    open_loop,
    percentile,
    tree_cpu,
    wait_http,
)

RESULTS = ROOT / "loadtests" / "results"
RATES = (100, 200, 400, 600, 800, 1000, 1200)
QUICK_RATES = (100, 400, 800)
BIG = 100_000  # simulator max_num_seqs, gateway max_in_flight and max_queue


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


# ------------------------------------------------------------------- memory
def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return sorted(out)


def tree_rss(root: int) -> dict[str, int]:
    per = {str(pid): rss_kb(pid) for pid in tree_pids(root)}
    return {"total": sum(per.values()), **per}


# ---------------------------------------------------------------- processes
class Stack:
    """A simulator and (optionally) a gateway in front of it; stopped by PID."""

    def __init__(
        self, src: Path, sim_flags: Sequence[str], workers: int | None, extra: dict[str, Any] | None = None
    ) -> None:
        py, env = sys.executable, {"PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"}
        self.children: list[Child] = []
        self.config: Path | None = None
        self.scratch: Path | None = None
        self.headers: dict[str, str] = {}  # what the client sends (the gateway's bearer token)
        sim_port = free_port()
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        try:
            sim_args = [py, "-m", "gateway", "sim", "--port", str(sim_port), "--max-num-seqs", str(BIG)]
            self.sim = Child("sim", [*sim_args, *sim_flags], env, src)
            self.children.append(self.sim)
            wait_http(self.sim_url + "/version", self.sim)
            self.gw: Child | None = None
            self.url = self.sim_url
            if workers is not None:
                # The measuring setup: JWT auth and in-memory limits on (never refusing).
                self.scratch = Path(tempfile.mkdtemp(prefix="capacity-"))
                self.config, auth_env, self.headers = auth_config(
                    self.scratch,
                    {
                        "backends": [{"url": self.sim_url, "max_in_flight": BIG}],
                        "admission": {"max_queue": BIG},
                        **(extra or {}),
                    },
                )
                env = {**env, **auth_env}
                gw_port = free_port()
                gw_args = [py, "-m", "gateway", "serve", "--config", str(self.config)]
                gw_args += ["--port", str(gw_port), "--workers", str(workers)]
                self.gw = Child("gateway", gw_args, env, src)
                self.children.append(self.gw)
                self.url = f"http://127.0.0.1:{gw_port}"
                wait_http(self.url + "/ready", self.gw, timeout=60)
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return all(c.proc.poll() is None for c in self.children)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def session(headers: dict[str, str], timeout: float | None = 60) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        headers=headers,
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
    )


def summarize(samples: Sequence[Sample], wall: float, sent_span: float) -> dict[str, Any]:
    good = [x.total for x in samples if x.ok]
    n = len(samples)
    return {
        "requests": n,
        "ok": len(good),
        "error_pct": 100 * (n - len(good)) / n if n else 0.0,
        "sent_rate": n / sent_span if sent_span > 0 else float("nan"),
        "goodput": len(good) / wall if wall > 0 else 0.0,
        "p50_ms": percentile(good, 50) * 1000,
        "p99_ms": percentile(good, 99) * 1000,
        "client_lag_p99_ms": percentile([x.lag for x in samples], 99) * 1000,
        "errors": sorted({x.error or "?" for x in samples if not x.ok})[:3],
    }


def sustainable(step: dict[str, Any]) -> bool:
    return bool(step["error_pct"] < 1.0 and step["p99_ms"] < 1000)


# -------------------------------------------------------------------- curve
async def run_step(
    url: str, headers: dict[str, str], rate: float, seconds: float, watch: dict[str, int]
) -> dict[str, Any]:
    body = chat_body(32, False)
    async with session(headers) as s:
        await open_loop(s, url + "/v1/chat/completions", body, False, min(rate, 100), 0.5)  # warm-up
        cpu0 = {name: tree_cpu(pid).exact for name, pid in watch.items()}
        c0, w0 = time.process_time(), time.perf_counter()
        samples = await open_loop(s, url + "/v1/chat/completions", body, False, rate, seconds)
        wall = time.perf_counter() - w0
        client = time.process_time() - c0
        cpu1 = {name: tree_cpu(pid).exact for name, pid in watch.items()}
    span = max(1, len(samples) - 1) / rate + max(x.lag for x in samples)  # last start - first start
    out = {"rate": rate, "seconds": seconds, "wall_s": wall, **summarize(samples, wall, span)}
    out["cpu_pct"] = {name: 100 * (cpu1[name] - cpu0[name]) / wall for name in watch}
    out["cpu_pct"]["client"] = 100 * client / wall
    out["sustainable"] = sustainable(out)
    return out


def curve(
    src: Path,
    sim_flags: Sequence[str],
    target: str,
    rates: Sequence[float],
    secs: float,
    ledger_dsn: str | None = None,
) -> Any:
    workers = {"direct": None, "gateway-1w": 1, "gateway-2w": 2, "gateway-1w-ledger": 1}[target]
    extra: dict[str, Any] | None = None
    if target == "gateway-1w-ledger":
        # The usage ledger on (docs/ledger.md): a schema of this run's own, PostgreSQL from --ledger-dsn.
        if not ledger_dsn:
            raise SystemExit("gateway-1w-ledger needs --ledger-dsn")
        scratch = Path(tempfile.mkdtemp(prefix="capacity-ledger-"))
        extra = {
            "ledger": {
                "dsn": ledger_dsn,
                "schema_name": f"capacity_{os.getpid()}_{int(time.time())}",
                "auto_migrate": True,
                "spool_dir": str(scratch / "spool"),
            }
        }
    stack = Stack(src, sim_flags, workers, extra)
    steps: list[dict[str, Any]] = []
    try:
        watch = {"sim": stack.sim.pid}
        if stack.gw is not None:
            watch = {"gateway": stack.gw.pid, **watch}
        for rate in rates:
            step = uvloop.run(run_step(stack.url, stack.headers, rate, secs, watch))
            steps.append(step)
            cpu = " ".join(f"{k} {v:.0f}%" for k, v in step["cpu_pct"].items())
            log(
                f"  {target} {rate:>5g}/s: sent {step['sent_rate']:.0f}/s goodput {step['goodput']:.0f}/s "
                f"err {step['error_pct']:.1f}% p50 {step['p50_ms']:.0f} ms p99 {step['p99_ms']:.0f} ms "
                f"lag p99 {step['client_lag_p99_ms']:.0f} ms | {cpu}"
            )
            if not stack.alive():
                raise RuntimeError(f"{target}: a process died")
            if not step["sustainable"]:
                break
            time.sleep(1)
    finally:
        stack.stop()
    ok = [s["rate"] for s in steps if s["sustainable"]]
    return {"target": target, "steps": steps, "max_sustainable_rate": max(ok) if ok else None}


# ------------------------------------------------------------------- memory
async def sim_ttft(sim_url: str, ttft: float) -> None:
    async with aiohttp.ClientSession() as s, s.post(sim_url + "/sim/control", json={"ttft": ttft}) as r:
        r.raise_for_status()


async def sim_waiting(sim_url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(sim_url + "/sim/stats") as r:
        data = await r.json()
    return int(data["running"]) + int(data["waiting"])


async def hold_streams(stack: Stack, n: int, ramp_rate: float) -> dict[str, Any]:
    assert stack.gw is not None
    gw = stack.gw.pid
    body = chat_body(32, True)
    url = stack.url + "/v1/chat/completions"
    # a little traffic first so that lazily built state is not counted per stream
    await sim_ttft(stack.sim_url, 0.05)
    await run_step(stack.url, stack.headers, 50, 1, {})
    await sim_ttft(stack.sim_url, 60)
    await asyncio.sleep(2)
    before = tree_rss(gw)
    async with session(stack.headers, timeout=None) as s:
        tasks = []
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i / ramp_rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(s, url, body, True, time.perf_counter())))
        deadline = time.monotonic() + 30
        waiting = 0
        while time.monotonic() < deadline:
            waiting = await sim_waiting(stack.sim_url)
            if waiting >= n:
                break
            await asyncio.sleep(0.5)
        opened_s = time.perf_counter() - t0
        await asyncio.sleep(3)
        during = tree_rss(gw)
        finished_early = sum(t.done() for t in tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(5)
    after = tree_rss(gw)
    waiting_after = await sim_waiting(stack.sim_url)
    await sim_ttft(stack.sim_url, 0.05)
    async with session(stack.headers, timeout=20) as s:
        plain = chat_body(32, False)
        checks = await asyncio.gather(*(one_request(s, url, plain, False, 0) for _ in range(20)))
        async with s.get(stack.url + "/ready") as r:
            ready = r.status
    return {
        "streams": n,
        "upstream_waiting_seen": waiting,
        "opened_in_s": opened_s,
        "finished_before_close": finished_early,
        "rss_kb_before": before,
        "rss_kb_open": during,
        "rss_kb_after_close": after,
        "kb_per_stream": (during["total"] - before["total"]) / n,
        "retained_kb_after_close": after["total"] - before["total"],
        "sim_running_waiting_after_close": waiting_after,
        "ready_status_after": ready,
        "plain_ok_after": sum(c.ok for c in checks),
        "plain_checks_after": len(checks),
    }


def memory(src: Path, n: int, workers: int, cycles: int) -> dict[str, Any]:
    stack = Stack(src, ["--ttft", "60", "--itl", "0.01", "--output-tokens", "32"], workers)
    try:
        res = uvloop.run(hold_streams(stack, n, 500))
        res["workers"] = workers
        # Later cycles on the same gateway: does the memory kept after the first close get reused?
        res["later_cycles"] = []
        for _ in range(cycles - 1):
            again = uvloop.run(hold_streams(stack, n, 500))
            res["later_cycles"].append(
                {
                    k: again[k]
                    for k in ("rss_kb_open", "rss_kb_after_close", "plain_ok_after", "ready_status_after")
                }
            )
            log(
                f"  memory {workers}w, again: rss open {again['rss_kb_open']['total']} KB, "
                f"closed {again['rss_kb_after_close']['total']} KB"
            )
        res["alive"] = stack.alive()
    finally:
        stack.stop()
    log(
        f"  memory {workers}w: {n} streams, rss {res['rss_kb_before']['total']} -> "
        f"{res['rss_kb_open']['total']} -> {res['rss_kb_after_close']['total']} KB, "
        f"{res['kb_per_stream']:.1f} KB/stream, ready {res['ready_status_after']}, "
        f"plain ok {res['plain_ok_after']}/{res['plain_checks_after']}"
    )
    return res


# --------------------------------------------------------------------- soak
async def soak_loop(stack: Stack, rate: float, seconds: float) -> dict[str, Any]:
    assert stack.gw is not None
    body = chat_body(32, False)
    url = stack.url + "/v1/chat/completions"
    rss: list[dict[str, Any]] = [{"t": 0.0, "kb": tree_rss(stack.gw.pid)["total"]}]
    slices: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    async with session(stack.headers) as s:
        while time.perf_counter() - t0 < seconds:
            w0 = time.perf_counter()
            samples = await open_loop(s, url, body, False, rate, 10)
            sl = summarize(samples, time.perf_counter() - w0, 10)
            sl.pop("errors")
            slices.append(sl)
            rss.append({"t": round(time.perf_counter() - t0, 1), "kb": tree_rss(stack.gw.pid)["total"]})
            t, kb = rss[-1]["t"], rss[-1]["kb"]
            log(f"  soak t={t:.0f}s rss {kb} KB err {sl['error_pct']:.2f}% p99 {sl['p99_ms']:.0f} ms")
    kbs = [r["kb"] for r in rss]
    total = sum(x["requests"] for x in slices)
    ok = sum(x["ok"] for x in slices)
    return {
        "rate": rate,
        "seconds": seconds,
        "requests": total,
        "error_pct": 100 * (total - ok) / total if total else 0.0,
        "p99_ms_worst_slice": max(x["p99_ms"] for x in slices),
        "p99_ms_median_slice": percentile([x["p99_ms"] for x in slices], 50),
        "rss_kb": rss,
        "rss_first_kb": kbs[0],
        "rss_after_first_slice_kb": kbs[1] if len(kbs) > 1 else kbs[0],
        "rss_last_kb": kbs[-1],
        "rss_max_kb": max(kbs),
        "drift_pct": 100 * (kbs[-1] - kbs[0]) / kbs[0],
        "drift_after_first_slice_pct": 100 * (kbs[-1] - kbs[1]) / kbs[1] if len(kbs) > 1 else 0.0,
        "slices": slices,
    }


def soak(src: Path, sim_flags: Sequence[str], rate: float, seconds: float) -> dict[str, Any]:
    stack = Stack(src, sim_flags, 1)
    try:
        res = uvloop.run(soak_loop(stack, rate, seconds))
        res["alive"] = stack.alive()
    finally:
        stack.stop()
    return res


# --------------------------------------------------------------------- main
def render(report: dict[str, Any]) -> str:
    lines = [f"commit {report['commit']}, {report['started']}", ""]
    for c in report.get("curves", []):
        lines += [f"### {c['target']} (max sustainable {c['max_sustainable_rate']}/s)", ""]
        lines += ["| rate | sent/s | goodput/s | err % | p50 ms | p99 ms | CPU % gateway | sim | client |"]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        for s in c["steps"]:
            cpu = s["cpu_pct"]
            gw = f"{cpu['gateway']:.0f}" if "gateway" in cpu else "-"
            lines.append(
                f"| {s['rate']:g} | {s['sent_rate']:.0f} | {s['goodput']:.0f} | {s['error_pct']:.2f} | "
                f"{s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {gw} | {cpu['sim']:.0f} | {cpu['client']:.0f} |"
            )
        lines.append("")
    for m in report.get("memory", []):
        lines.append(
            f"memory {m['workers']}w: {m['streams']} streams: {m['rss_kb_before']['total']} -> "
            f"{m['rss_kb_open']['total']} KB open -> {m['rss_kb_after_close']['total']} KB closed; "
            f"{m['kb_per_stream']:.1f} KB per stream"
        )
    sk = report.get("soak")
    if sk:
        lines.append(
            f"soak {sk['rate']:g}/s {sk['seconds']:g}s: rss first {sk['rss_first_kb']} "
            f"last {sk['rss_last_kb']} max {sk['rss_max_kb']} KB, drift {sk['drift_pct']:.1f}% "
            f"({sk['drift_after_first_slice_pct']:.1f}% after the first 10 s), err {sk['error_pct']:.2f}%"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rates, 3 s steps, 500 streams, 30 s soak")
    p.add_argument("--parts", default="curve,memory,soak", help="comma-separated: curve, memory, soak")
    p.add_argument(
        "--targets",
        default="direct,gateway-1w,gateway-2w",
        help="curves to run: direct, gateway-1w, gateway-2w, gateway-1w-ledger (needs --ledger-dsn)",
    )
    p.add_argument("--rates", default=None, help="request rates of the curve steps (comma-separated)")
    p.add_argument("--step-seconds", type=float, default=None, help="default 8 (quick: 3)")
    p.add_argument("--streams", type=int, default=None, help="default 2000 (quick: 500)")
    p.add_argument("--memory-workers", default="1,2")
    p.add_argument("--memory-cycles", type=int, default=2, help="open/close rounds on the same gateway")
    p.add_argument("--soak-rate", type=float, default=None, help="default: half the 1-worker max")
    p.add_argument("--soak-seconds", type=float, default=None, help="default 300 (quick: 30)")
    p.add_argument("--gateway-src", type=Path, default=ROOT)
    p.add_argument(
        "--ledger-dsn",
        default=None,
        help="PostgreSQL for the gateway-1w-ledger curve (e.g. postgresql://127.0.0.1:5432/test)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    quick: dict[str, Any] = {"rates": QUICK_RATES, "step_seconds": 3.0, "streams": 500, "soak_seconds": 30.0}
    full: dict[str, Any] = {"rates": RATES, "step_seconds": 8.0, "streams": 2000, "soak_seconds": 300.0}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, ",".join(str(r) for r in value) if key == "rates" else value)
    args.gateway_src = args.gateway_src.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile()
    started = dt.datetime.now(dt.UTC)
    parts = set(args.parts.split(","))
    sim_flags = ["--ttft", "0.05", "--itl", "0.01", "--output-tokens", "32"]
    rates = [float(r) for r in args.rates.split(",")]
    report: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "gateway_src": str(args.gateway_src),
        "machine": machine(),
        "settings": {
            "sim_flags": sim_flags,
            "max_tokens": 32,
            "sim_max_num_seqs_gateway_max_in_flight_max_queue": BIG,
            "step_seconds": args.step_seconds,
            "client_nofile": nofile,
            "quick": args.quick,
        },
    }
    if "curve" in parts:
        report["curves"] = []
        for target in args.targets.split(","):
            log(f"curve {target}")
            report["curves"].append(
                curve(args.gateway_src, sim_flags, target, rates, args.step_seconds, args.ledger_dsn)
            )
    if "memory" in parts:
        report["memory"] = []
        for w in args.memory_workers.split(","):
            log(f"memory, {w} worker(s)")
            report["memory"].append(memory(args.gateway_src, args.streams, int(w), args.memory_cycles))
    if "soak" in parts:
        rate = args.soak_rate
        if rate is None:
            one = [c for c in report.get("curves", []) if c["target"] == "gateway-1w"]
            if not one or not one[0]["max_sustainable_rate"]:
                raise SystemExit("soak: give --soak-rate or run the gateway-1w curve")
            rate = one[0]["max_sustainable_rate"] / 2
        log(f"soak at {rate:g}/s for {args.soak_seconds:g}s")
        report["soak"] = soak(args.gateway_src, sim_flags, rate, args.soak_seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    path = args.out / f"capacity-{started.strftime('%Y%m%d-%H%M%S')}{suffix}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    print(render(report))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
