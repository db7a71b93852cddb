"""The response cache under load (``python -m loadtests.cache``): backend requests saved, a hit's
latency against a Redis GET, and the gateway's CPU per miss with the cache on and off.

Starts its own simulator and two gateways in front of it on free 127.0.0.1 ports, one with the
cache on (Redis at ``--redis``, a fresh ``bench:cache:<random>:`` key prefix whose keys are
deleted at the end) and one with it off, both as ``make bench`` runs them (JWT auth and in-memory
limits on, set too high to refuse); drives them from an aiohttp client on uvloop in this process
and stops every process it started by PID. Every request is a deterministic (``temperature: 0``)
chat completion, non-streamed. Parts (``--parts``, default all):

    dedup    ``--requests`` requests at ``--concurrency`` (closed loop), ``--dup-rate`` of them
             repeating a prompt sent at least 2 x concurrency requests earlier, the rest unique;
             the same sequence to the cache-on and to the cache-off gateway. Reports requests sent
             vs generation requests the simulator received (``/sim/stats``), the hit/miss/bypass
             headers, and latency p50/p99 of hits and misses under that load.
    latency  one request at a time, interleaved: a hit, a Redis GET of a stored entry (redis-py's
             asyncio client, the reference "same kind of client"; and the gateway's own pipelined
             client), a POST the gateway refuses itself (401, no token: its HTTP and ASGI floor)
             and ``GET /live``. Added latency of a hit = hit p50 - redis-py GET p50.
    cpu      open-loop unique deterministic requests (every one a miss) at each of ``--cpu-rates``,
             in alternating slices A B B A (cache on, off, off, on per round) so that drift in the
             machine's load weighs on both alike; gateway CPU per request from /proc (every
             thread's schedstat run time), gross and net of each gateway's idle burn (its CPU while
             the other one is measured). The issue's bound: a miss costs <= 10 % more with the
             cache on. A third gateway, cache on with the same entries and no traffic, shows what
             the fills' notices cost every other replica.
    stage    in-process, no HTTP: the cache stage's own CPU per miss (``ResponseCache.lookup`` and
             ``finish`` with its fill, on real Redis), busy and after 20 ms idle, then its parts
             one at a time (a Redis round trip, the notice, the task, the key, the timeouts).

Results: a JSON file in ``--out`` (default loadtests/results/) and a Markdown summary on stdout.
``--smoke``: a few seconds of each part (tests/test_loadtests_smoke.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
import uvloop
from redis.utils import HIREDIS_AVAILABLE

from loadtests.bench import ROOT, Child, auth_config, free_port, git, machine, percentile, tree_cpu, wait_http

RESULTS = ROOT / "loadtests" / "results"
BIG = 100_000  # simulator max_num_seqs, gateway max_in_flight and max_queue: no queue of the setup's own
CHAT = "/v1/chat/completions"


def log(msg: str) -> None:
    print(f"[cache] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes
class Stack:
    """One simulator, a gateway with the cache on and one with it off, and (``replica``) a second
    cache-on gateway sharing the first one's entries that gets no traffic; stopped by PID."""

    def __init__(self, redis_url: str, sim_flags: Sequence[str], prefix: str, replica: bool) -> None:
        py = sys.executable
        self.children: list[Child] = []
        self.scratch = Path(tempfile.mkdtemp(prefix="cache-load-"))
        sim_port = free_port()
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        base: dict[str, Any] = {
            "backends": [{"url": self.sim_url, "max_in_flight": BIG}],
            "admission": {"max_queue": BIG},
        }
        # Entries outlive a crashed run by at most ttl; a finished run deletes its prefix.
        cache = {"storage": redis_url, "key_prefix": prefix, "ttl": 900}
        try:
            sim_args = [py, "-m", "gateway", "sim", "--port", str(sim_port), "--max-num-seqs", str(BIG)]
            self.sim = Child("sim", [*sim_args, *sim_flags])
            self.children.append(self.sim)
            wait_http(self.sim_url + "/version", self.sim)
            self.on = self._gateway("on", {**base, "cache": cache})
            self.off = self._gateway("off", base)
            self.replica = self._gateway("replica", {**base, "cache": cache}) if replica else None
        except BaseException:
            self.stop()
            raise

    def _gateway(self, name: str, extra: dict[str, Any]) -> Gateway:
        directory = self.scratch / name
        directory.mkdir()
        config, env, headers = auth_config(directory, extra)
        port = free_port()
        args = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
        child = Child(f"gateway-{name}", args, {**env, "PYTHONUNBUFFERED": "1"})
        self.children.append(child)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/ready", child, timeout=60)
        return Gateway(name, url, child, {**headers, "Content-Type": "application/json"})

    def alive(self) -> bool:
        return all(c.proc.poll() is None for c in self.children)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass(frozen=True)
class Gateway:
    name: str
    url: str
    child: Child
    headers: dict[str, str]

    @property
    def pid(self) -> int:
        return self.child.pid


async def sim_received(s: aiohttp.ClientSession, sim_url: str) -> int:
    async with s.get(sim_url + "/sim/stats") as r:
        return int((await r.json())["received"])


def session(headers: dict[str, str] | None = None, limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        headers=headers,
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=60),
    )


# --------------------------------------------------------------------- load
@dataclass(slots=True)
class Answer:
    ok: bool
    status: int
    cache: str  # the x-gateway-cache header ("-" when absent)
    seconds: float
    lag: float = 0.0  # open loop: how late the request started against its schedule
    error: str | None = None


async def post(s: aiohttp.ClientSession, url: str, body: bytes, expect: int = 200) -> Answer:
    t0 = time.perf_counter()
    try:
        async with s.post(url, data=body) as resp:
            data = await resp.read()
            status, cache = resp.status, resp.headers.get("x-gateway-cache", "-")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Answer(False, 0, "-", time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - t0
    ok = status == expect and (expect != 200 or data.startswith(b"{") or data.endswith(b"data: [DONE]\n\n"))
    return Answer(ok, status, cache, seconds, error=None if ok else f"status {status}")


def chat(prompt: str, max_tokens: int, stream: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def workload(tag: str, n: int, dup_rate: float, concurrency: int, seed: int) -> tuple[list[str], list[bool]]:
    """``n`` prompts in order, and which ones repeat an earlier one. Exactly round(n x dup_rate)
    repeats, each of a unique prompt sent at least 2 x concurrency positions before it (long
    answered and stored, so a repeat is a plain hit rather than a wait on the first one's fill)."""
    rng = random.Random(seed)
    gap = 2 * concurrency
    dups = set(rng.sample(range(gap, n), min(round(n * dup_rate), max(0, n - gap))))
    prompts: list[str] = []
    unique_at: list[int] = []
    for i in range(n):
        if i in dups:
            eligible = [j for j in unique_at if j <= i - gap]  # non-empty: positions < gap are unique
            prompts.append(prompts[rng.choice(eligible)])
        else:
            unique_at.append(i)
            prompts.append(f"{tag} request {i}: what does a response cache save?")
    return prompts, [i in dups for i in range(n)]


def summarize(answers: Sequence[Answer]) -> dict[str, Any]:
    def ms(values: Sequence[float], q: float) -> float:
        return round(percentile(values, q) * 1000, 3)

    out: dict[str, Any] = {
        "requests": len(answers),
        "ok": sum(a.ok for a in answers),
        "errors": sorted({a.error or "?" for a in answers if not a.ok})[:3],
        "cache_headers": {k: sum(a.cache == k for a in answers) for k in ("hit", "miss", "bypass", "-")},
    }
    for label in ("hit", "miss", "-"):
        lat = [a.seconds for a in answers if a.ok and a.cache == label]
        if lat:
            out[f"{'uncached' if label == '-' else label}_ms"] = {
                "n": len(lat),
                "p50": ms(lat, 50),
                "p90": ms(lat, 90),
                "p99": ms(lat, 99),
            }
    return out


async def closed_loop(gw: Gateway, bodies: Sequence[bytes], concurrency: int) -> tuple[list[Answer], float]:
    answers: list[Answer | None] = [None] * len(bodies)
    left = iter(range(len(bodies)))
    async with session(gw.headers) as s:

        async def client() -> None:
            for i in left:
                answers[i] = await post(s, gw.url + CHAT, bodies[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return [a for a in answers if a is not None], wall


async def dedup_one(
    gw: Gateway, sim_url: str, bodies: Sequence[bytes], dups: Sequence[bool], concurrency: int
) -> dict[str, Any]:
    async with session() as s:
        before = await sim_received(s, sim_url)
    answers, wall = await closed_loop(gw, bodies, concurrency)
    async with session() as s:
        received = await sim_received(s, sim_url) - before
    out = summarize(answers)
    repeats = [a for a, d in zip(answers, dups, strict=True) if d]
    out.update(
        {
            "sent": len(bodies),
            "repeats_sent": sum(dups),
            "repeats_answered_hit": sum(a.cache == "hit" for a in repeats),
            "backend_received": received,
            "backend_saved_pct": round(100 * (len(bodies) - received) / len(bodies), 2),
            "wall_s": round(wall, 2),
            "throughput_per_s": round(len(bodies) / wall, 1),
        }
    )
    return out


def dedup(stack: Stack, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    prompts, dups = workload(f"{tag}-dedup", args.requests, args.dup_rate, args.concurrency, args.seed)
    bodies = [chat(p, args.max_tokens) for p in prompts]
    out: dict[str, Any] = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "dup_rate": args.dup_rate,
        "max_tokens": args.max_tokens,
    }
    for gw in (stack.on, stack.off):
        res = uvloop.run(dedup_one(gw, stack.sim_url, bodies, dups, args.concurrency))
        out[f"cache_{gw.name}"] = res
        log(
            f"dedup, cache {gw.name}: sent {res['sent']} (repeats {res['repeats_sent']}), backend received "
            f"{res['backend_received']} (saved {res['backend_saved_pct']} %), headers {res['cache_headers']}"
        )
    on, off = out["cache_on"], out["cache_off"]
    out["backend_fall_pct"] = round(
        100 * (off["backend_received"] - on["backend_received"]) / off["backend_received"], 2
    )
    return out


# ------------------------------------------------------------------ latency
async def entry_keys(r: aioredis.Redis, prefix: str) -> list[bytes]:
    return [k async for k in r.scan_iter(match=prefix + "e:*", count=1000)]


async def latency_run(
    stack: Stack, redis_url: str, prefix: str, tag: str, prompts: int, samples: int, max_tokens: int
) -> dict[str, Any]:
    from gateway.cache.resp import RespClient

    gw = stack.on
    bodies = [
        chat(f"{tag} latency {i}: what does a response cache save?", max_tokens) for i in range(prompts)
    ]
    r = aioredis.Redis.from_url(redis_url)
    fast = RespClient(redis_url, 1)
    try:
        stored = len(await entry_keys(r, prefix))
        async with session(gw.headers) as many:  # the entries, filled all at once
            fills = await asyncio.gather(*(post(many, gw.url + CHAT, b) for b in bodies))
        async with session(gw.headers, limit=1) as s, session(limit=1) as bare:
            if not all(a.ok and a.cache == "miss" for a in fills):
                raise RuntimeError(f"latency: the first requests were not all misses: {summarize(fills)}")
            deadline = time.monotonic() + 20
            while len(keys := await entry_keys(r, prefix)) < stored + prompts:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"latency: {len(keys) - stored} of {prompts} entries stored after 20 s"
                    )
                await asyncio.sleep(0.05)
            sizes = sorted([int(await r.strlen(k)) for k in keys])
            for k in keys[:20]:  # warm both Redis clients' connections
                await r.get(k)
                await fast.call(b"GET", k)
            await bare.get(gw.url + "/live")
            hits: list[Answer] = []
            get_py: list[float] = []
            get_fast: list[float] = []
            refused: list[float] = []
            live: list[float] = []
            for i in range(samples):
                hits.append(await post(s, gw.url + CHAT, bodies[i % prompts]))
                key = keys[i % len(keys)]
                t0 = time.perf_counter()
                value = await r.get(key)
                get_py.append(time.perf_counter() - t0)
                assert value is not None
                t0 = time.perf_counter()
                await fast.call(b"GET", key)
                get_fast.append(time.perf_counter() - t0)
                a = await post(bare, gw.url + CHAT, bodies[0], expect=401)
                if a.ok:
                    refused.append(a.seconds)
                t0 = time.perf_counter()
                async with bare.get(gw.url + "/live") as resp:
                    await resp.read()
                    if resp.status == 200:
                        live.append(time.perf_counter() - t0)
    finally:
        fast.close()
        await r.aclose()

    def ms(values: Sequence[float]) -> dict[str, float]:
        return {
            "n": len(values),
            "p50": round(percentile(values, 50) * 1000, 3),
            "p90": round(percentile(values, 90) * 1000, 3),
            "p99": round(percentile(values, 99) * 1000, 3),
        }

    hit_s = [a.seconds for a in hits if a.ok and a.cache == "hit"]
    out = {
        "samples": samples,
        "prompts": prompts,
        "entry_bytes_p50": sizes[len(sizes) // 2],
        "hit_answers": summarize(hits)["cache_headers"],
        "hit_ms": ms(hit_s),
        "redis_get_redis_py_ms": ms(get_py),
        "redis_get_gateway_resp_client_ms": ms(get_fast),
        "gateway_401_ms": ms(refused),
        "gateway_live_ms": ms(live),
        "redis_py_hiredis": HIREDIS_AVAILABLE,
    }
    out["hit_added_over_redis_get_p50_ms"] = round(
        out["hit_ms"]["p50"] - out["redis_get_redis_py_ms"]["p50"], 3
    )
    out["hit_added_over_401_p50_ms"] = round(out["hit_ms"]["p50"] - out["gateway_401_ms"]["p50"], 3)
    return out


def latency(stack: Stack, args: argparse.Namespace, prefix: str, tag: str) -> dict[str, Any]:
    res = uvloop.run(
        latency_run(stack, args.redis, prefix, tag, args.hit_prompts, args.hit_samples, args.max_tokens)
    )
    log(
        f"latency: hit p50 {res['hit_ms']['p50']} ms p99 {res['hit_ms']['p99']} ms, redis-py GET p50 "
        f"{res['redis_get_redis_py_ms']['p50']} ms ({res['entry_bytes_p50']} B), added "
        f"{res['hit_added_over_redis_get_p50_ms']} ms; 401 p50 {res['gateway_401_ms']['p50']} ms"
    )
    return res


# ---------------------------------------------------------------------- cpu
async def open_loop(gw: Gateway, bodies: Sequence[bytes], rate: float) -> list[Answer]:
    """Start the requests at fixed intervals, never waiting for answers."""
    async with session(gw.headers) as s:
        start = time.perf_counter() + 0.005
        tasks: list[asyncio.Task[Answer]] = []

        async def one(body: bytes, at: float) -> Answer:
            lag = time.perf_counter() - at
            a = await post(s, gw.url + CHAT, body)
            a.lag = lag
            return a

        for i, body in enumerate(bodies):
            at = start + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body, at)))
        return list(await asyncio.gather(*tasks))


def redis_cpu(url: str) -> float | None:
    """Redis' own CPU seconds (INFO cpu): context only, the server is shared with anything else."""
    import redis

    try:
        info = redis.Redis.from_url(url).info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except (redis.RedisError, KeyError, ValueError):
        return None


def _side(slices: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    mine = [x for x in slices if x["gateway"] == name]
    theirs = [x for x in slices if x["gateway"] != name]
    n = sum(x["requests"] for x in mine)
    busy = sum(x["cpu_s"] for x in mine)
    wall = sum(x["wall_s"] for x in mine)
    idle_rate = sum(x["other_cpu_s"] for x in theirs) / sum(x["wall_s"] for x in theirs)
    redis_s = [x["redis_cpu_s"] for x in mine]
    return {
        "requests": n,
        "ok": sum(x["ok"] for x in mine),
        "cache_headers": {k: sum(x["cache_headers"][k] for x in mine) for k in mine[0]["cache_headers"]},
        "us_per_request": round(1e6 * busy / n, 1),
        "idle_cpu_pct": round(100 * idle_rate, 3),
        "us_per_request_net_of_idle": round(1e6 * (busy - idle_rate * wall) / n, 1),
        "us_per_request_by_slice": [round(1e6 * x["cpu_s"] / x["requests"], 1) for x in mine],
        "user_us_per_request": round(1e6 * sum(x["user_s"] for x in mine) / n, 1),
        "system_us_per_request": round(1e6 * sum(x["system_s"] for x in mine) / n, 1),
        "client_start_lag_p99_ms": max(x["lag_p99_ms"] for x in mine),
        "redis_us_per_request": None if None in redis_s else round(1e6 * sum(redis_s) / n, 1),
    }


def cpu_at(stack: Stack, rate: float, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Gateway CPU per miss at one arrival rate: slices A B B A per round (A: cache on)."""
    per = max(1, round(rate * args.cpu_slice_seconds))
    order = [g for _ in range(args.cpu_rounds) for g in (stack.on, stack.off, stack.off, stack.on)]
    replica = stack.replica
    slices: list[dict[str, Any]] = []
    for gw in (stack.on, stack.off):  # unmeasured: connections, lazily built state, the first fills
        warm = [
            chat(f"{tag} warm {rate} {gw.name} {i}", args.max_tokens, args.cpu_stream)
            for i in range(min(per, 50))
        ]
        uvloop.run(open_loop(gw, warm, rate))
    time.sleep(0.5)
    for k, gw in enumerate(order):
        prompt = f"{tag} cpu {rate} {k} {{}}: what does a response cache save?"
        bodies = [chat(prompt.format(i), args.max_tokens, args.cpu_stream) for i in range(per)]
        other = stack.off if gw is stack.on else stack.on
        watch = [gw, other] if replica is None else [gw, other, replica]
        before = [tree_cpu(g.pid) for g in watch]
        r0, w0 = redis_cpu(args.redis), time.perf_counter()
        answers = uvloop.run(open_loop(gw, bodies, rate))
        time.sleep(0.3)  # the last answers' fills (cache on) land inside the slice, for both alike
        after = [tree_cpu(g.pid) for g in watch]
        r1, w1 = redis_cpu(args.redis), time.perf_counter()
        used = [b - a for a, b in zip(before, after, strict=True)]
        s = summarize(answers)
        sl = {
            "gateway": gw.name,
            "requests": per,
            "ok": s["ok"],
            "cache_headers": s["cache_headers"],
            "wall_s": round(w1 - w0, 3),
            "cpu_s": used[0].exact,
            "user_s": used[0].user,
            "system_s": used[0].system,
            "other_cpu_s": used[1].exact,
            "replica_cpu_s": used[2].exact if replica is not None else None,
            "redis_cpu_s": None if r0 is None or r1 is None else r1 - r0,
            "lag_p99_ms": round(percentile([a.lag for a in answers], 99) * 1000, 2),
        }
        slices.append(sl)
        log(
            f"cpu {rate:g}/s slice {k + 1}/{len(order)} cache {gw.name}: "
            f"{1e6 * sl['cpu_s'] / per:.0f} µs/request, headers {s['cache_headers']}, ok {s['ok']}/{per}"
        )
        if not stack.alive():
            raise RuntimeError("cpu: a process died")
    out: dict[str, Any] = {"rate": rate, "slices": slices, "cache_on": _side(slices, "on")}
    out["cache_off"] = _side(slices, "off")
    on, off = out["cache_on"], out["cache_off"]
    for label, metric in (("gross", "us_per_request"), ("net", "us_per_request_net_of_idle")):
        out[f"miss_extra_pct_{label}"] = round(100 * (on[metric] - off[metric]) / off[metric], 1)
    out["miss_extra_us"] = round(on["us_per_request_net_of_idle"] - off["us_per_request_net_of_idle"], 1)
    per_round = []  # the spread of the estimate, round by round
    for k in range(args.cpu_rounds):
        group = slices[4 * k : 4 * k + 4]
        a, b = (sum(x["cpu_s"] for x in group if x["gateway"] == n) / (2 * per) for n in ("on", "off"))
        per_round.append(round(100 * (a - b) / b, 1))
    out["miss_extra_pct_by_round"] = per_round
    if replica is not None:
        # A replica with no traffic of its own still hears every fill's notice (one pub/sub channel)
        during = [x for x in slices if x["gateway"] == "on"]
        idle = [x for x in slices if x["gateway"] == "off"]
        idle_rate = sum(x["replica_cpu_s"] for x in idle) / sum(x["wall_s"] for x in idle)
        fills = sum(x["requests"] for x in during)
        extra = sum(x["replica_cpu_s"] - idle_rate * x["wall_s"] for x in during)
        out["idle_replica_us_per_fill_elsewhere"] = round(1e6 * extra / fills, 1)
    log(
        f"cpu {rate:g}/s: {on['us_per_request_net_of_idle']} µs per miss (cache on) vs "
        f"{off['us_per_request_net_of_idle']} (off), net of idle: {out['miss_extra_pct_net']} % more; "
        f"by round {per_round}; idle replica {out.get('idle_replica_us_per_fill_elsewhere')} µs per fill"
    )
    return out


def cpu(stack: Stack, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    rates = [float(r) for r in args.cpu_rates.split(",")]
    return {
        "slice_seconds": args.cpu_slice_seconds,
        "rounds": args.cpu_rounds,
        "max_tokens": args.max_tokens,
        "stream": args.cpu_stream,
        "by_rate": [cpu_at(stack, rate, args, tag) for rate in rates],
    }


# -------------------------------------------------------------------- stage
class Indices:
    """Fresh request numbers for each measurement: a miss must never meet an earlier entry."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> range:
        r = range(self.next, self.next + n)
        self.next += n
        return r


async def _cpu_per_call(
    fn: Callable[[int], Awaitable[object]], ids: Indices, n: int, idle: float = 0.0
) -> float:
    """Process CPU µs per call of ``fn(i)`` over ``n`` calls (after min(n, 200) unmeasured ones),
    each with fresh ``i``. ``idle``: seconds the process sleeps before each call, outside the
    measurement (a call that finds the process idle, as a lightly loaded gateway does)."""
    for i in ids.take(min(n, 200)):
        await fn(i)
    spent = 0.0
    if idle:
        for i in ids.take(n):
            await asyncio.sleep(idle)
            t = time.process_time()
            await fn(i)
            spent += time.process_time() - t
    else:
        t = time.process_time()
        for i in ids.take(n):
            await fn(i)
        spent = time.process_time() - t
    return spent / n * 1e6


async def stage_run(redis_url: str, prefix: str, n: int) -> dict[str, Any]:
    """The cache stage's CPU on a miss, in this process (uvloop), on real Redis: the whole miss as
    the proxy runs it (lookup, then finish with its fill), then its parts one at a time."""
    from gateway.app import create_app
    from gateway.cache.entry import PLAIN, Entry
    from gateway.cache.key import make_key
    from gateway.cache.resp import RespClient
    from gateway.cache.stage import MISS, Lookup, parse_cache_control
    from gateway.config import load_settings
    from gateway.pipeline.exchange import Exchange
    from gateway.pipeline.receive import CHAT as CHAT_ENDPOINT
    from gateway.pipeline.receive import parse

    digest = hashlib.sha256(b"sk-cache-stage").hexdigest()
    settings = load_settings(
        None,
        auth={"api_keys": [{"sha256": digest, "subject": "svc", "team": "a"}]},
        teams={"a": {}},
        cache={"storage": redis_url, "key_prefix": prefix, "ttl": 900},
    )
    gw = create_app(settings).gateway
    cache = gw.cache
    assert cache is not None
    await cache.start()  # the notices' subscriber and the warm-up, as the app's lifespan does
    principal = await gw.auth.authenticate({"headers": [(b"authorization", b"Bearer sk-cache-stage")]})
    scope: dict[str, Any] = {"headers": [(b"content-type", b"application/json")]}
    answer = orjson.dumps(
        {
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "created": 1,
            "model": "tiny",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "word " * 32},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 32, "total_tokens": 44},
        }
    )
    cold = max(20, n // 20)
    total = 14 * (n + 200) + 2 * (cold + 200)  # every measurement below takes fresh numbers
    # parsing is the pipeline's, not the cache's: done before any timing
    reqs = [
        parse(
            CHAT_ENDPOINT,
            chat(f"stage {prefix} {i}: what does a response cache save?", 32),
            settings.validation,
        )
        for i in range(total)
    ]
    ids = Indices()
    loop = asyncio.get_running_loop()

    async def miss(i: int) -> None:
        look = await cache.lookup(scope, principal, "chat", "default", reqs[i], loop.time() + 60, 10)
        assert look.status == "miss" and look.filler, look.status
        ex = Exchange("rid", "chat", time.perf_counter(), principal=principal, model="tiny", status=200)
        ex.cache_look, ex.cache = look, look.status
        ex.cache_tap, ex.cache_complete = [answer], True  # what the relay keeps of a plain answer
        ex.prompt_tokens, ex.completion_tokens = 12, 32
        cache.finish(ex, True)
        await asyncio.gather(*cache._tasks)  # the fill, as its own task

    us: dict[str, float] = {}
    us["miss: lookup (EVALSHA) + finish (metrics, entry, fill EVALSHA, notice heard)"] = await _cpu_per_call(
        miss, ids, n
    )
    us["the same miss, the process idle 20 ms before it"] = await _cpu_per_call(miss, ids, cold, idle=0.02)
    body = reqs[0].body

    async def key_only(i: int) -> None:
        make_key(prefix, principal, "team", "chat", "tiny", "", reqs[i].body)

    us["make_key (canonical JSON + BLAKE2b)"] = await _cpu_per_call(key_only, ids, n)

    async def decide(i: int) -> None:
        cache._decide(cache._default, parse_cache_control({"headers": []}), "chat", body)

    us["_decide + parse_cache_control (no header)"] = await _cpu_per_call(decide, ids, n)

    async def lookup_only(i: int) -> None:
        k = make_key(prefix, principal, "team", "chat", "tiny", "", reqs[i].body)
        await cache.store.lookup(k, f"t{i}", 60_000, True)

    us["store.lookup: one EVALSHA round trip (with make_key)"] = await _cpu_per_call(lookup_only, ids, n)
    key = make_key(prefix, principal, "team", "chat", "tiny", "", body)
    value = Entry(PLAIN, time.time(), 12, 32, answer).encode()

    async def encode_only(i: int) -> None:
        Entry(PLAIN, time.time(), 12, 32, b"".join([answer])).encode()

    us["entry: join the tap + Entry.encode"] = await _cpu_per_call(encode_only, ids, n)
    ex0 = Exchange("rid", "chat", time.perf_counter(), principal=principal, model="tiny", status=200)
    ex0.route = "default"
    look0 = Lookup(MISS)

    async def record_only(i: int) -> None:
        cache.metrics.record(ex0, look0, True)

    us["metrics.record (a miss)"] = await _cpu_per_call(record_only, ids, n)

    async def nothing() -> None:
        return None

    async def timeout_only(i: int) -> None:
        async with asyncio.timeout(0.1):
            await nothing()  # returns without suspending: the timeout's own cost

    us["asyncio.timeout around a call (enter, exit; 3 per miss)"] = await _cpu_per_call(timeout_only, ids, n)

    async def spawn_only(i: int) -> None:
        cache._spawn(nothing())
        await asyncio.gather(*cache._tasks)

    us["a task of its own (create, run, discard; empty coroutine)"] = await _cpu_per_call(spawn_only, ids, n)

    async def fill_only(i: int) -> None:
        await cache.store.fill(key, PLAIN, value, 900_000, "")

    us[
        "store.fill: one EVALSHA round trip (SET, lock check, PUBLISH) + its notice heard"
    ] = await _cpu_per_call(fill_only, ids, n)
    listener = cache.store._listener  # without the subscriber: what a notice costs the filler
    if listener is not None:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    cache.store._listener = None
    us["store.fill without the notices' subscriber"] = await _cpu_per_call(fill_only, ids, n)
    us["miss without the notices' subscriber"] = await _cpu_per_call(miss, ids, n)
    fast = RespClient(redis_url, 1)
    r = aioredis.Redis.from_url(redis_url)

    async def ping_fast(i: int) -> None:
        await fast.call(b"PING")

    async def get_py(i: int) -> None:
        await r.get(key.entry + "j")

    us["reference: PING on the pipelined client (one round trip)"] = await _cpu_per_call(ping_fast, ids, n)
    us["reference: the same PING, the process idle 20 ms before it"] = await _cpu_per_call(
        ping_fast, ids, cold, idle=0.02
    )
    us["reference: GET of the entry on redis-py"] = await _cpu_per_call(get_py, ids, n)
    fast.close()
    await r.aclose()
    await cache.close()
    return {
        "calls": n,
        "calls_after_idle": cold,
        "us_per_call": {k: round(v, 1) for k, v in us.items()},
    }


def stage(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    res = uvloop.run(stage_run(args.redis, prefix + "stage:", args.stage_calls))
    for name, us in res["us_per_call"].items():
        log(f"stage: {name}: {us} µs")
    return res


# ---------------------------------------------------------------- clean-up
async def purge(redis_url: str, prefix: str) -> int:
    r = aioredis.Redis.from_url(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for k in r.scan_iter(match=prefix + "*", count=1000):
            batch.append(k)
            if len(batch) >= 500:
                deleted += int(await r.unlink(*batch))
                batch.clear()
        if batch:
            deleted += int(await r.unlink(*batch))
    finally:
        await r.aclose()
    return deleted


# --------------------------------------------------------------------- main
def pair(q: dict[str, Any] | None) -> str:
    return f"{q['p50']} / {q['p99']}" if q else "-"


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        f"# Response cache load test ({report['started']}, commit {report['commit']})",
        "",
        f"{m['nproc']} CPUs ({m['cpu_model']}), load average at start {m['loadavg_at_start']}; "
        f"simulator {' '.join(report['settings']['sim_flags'])}; client, simulator, gateways and Redis "
        "share the machine.",
        "",
    ]
    d = report.get("dedup")
    if d:
        on, off = d["cache_on"], d["cache_off"]
        out += [
            f"## Backend requests: {d['requests']} requests at concurrency {d['concurrency']}, "
            f"{round(100 * d['dup_rate'])} % repeats",
            "",
            "| cache | sent | backend received | saved | hit / miss / bypass | hit p50 / p99 ms | "
            "miss p50 / p99 ms | req/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in (("on", on), ("off", off)):
            h = r["cache_headers"]
            hit, miss = r.get("hit_ms"), r.get("miss_ms", r.get("uncached_ms"))
            out.append(
                f"| {name} | {r['sent']} | {r['backend_received']} | {r['backend_saved_pct']} % | "
                f"{h['hit']} / {h['miss']} / {h['bypass']} | "
                f"{pair(hit)} | {pair(miss)} | {r['throughput_per_s']} |"
            )
        out += ["", f"Backend requests fell by {d['backend_fall_pct']} % with the cache on.", ""]
    lat = report.get("latency")
    if lat:
        rows = [
            ("cache hit (POST through the gateway)", lat["hit_ms"]),
            (
                f"Redis GET of an entry ({lat['entry_bytes_p50']} B), redis-py asyncio",
                lat["redis_get_redis_py_ms"],
            ),
            (
                "Redis GET of an entry, the gateway's pipelined client",
                lat["redis_get_gateway_resp_client_ms"],
            ),
            ("POST the gateway refuses itself (401, no token)", lat["gateway_401_ms"]),
            ("GET /live", lat["gateway_live_ms"]),
        ]
        out += [
            f"## Hit latency, one request at a time ({lat['samples']} samples of each, interleaved)",
            "",
            "| what | p50 ms | p90 ms | p99 ms |",
            "|---|---|---|---|",
            *[f"| {name} | {v['p50']} | {v['p90']} | {v['p99']} |" for name, v in rows],
            "",
            f"A hit's added latency over a Redis GET (p50): {lat['hit_added_over_redis_get_p50_ms']} ms "
            f"(target <= 1 ms); over the gateway's own 401: {lat['hit_added_over_401_p50_ms']} ms.",
            "",
        ]
    c = report.get("cpu")
    if c:
        out += [
            f"## Gateway CPU per miss: unique requests, open loop, {c['rounds']} rounds of A B B A slices "
            f"of {c['slice_seconds']:g} s",
            "",
            "| rate | cache | requests | µs per request | net of idle | user / system | by slice | "
            "client lag p99 ms | Redis µs per request (shared) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in c["by_rate"]:
            for name in ("on", "off"):
                x = r[f"cache_{name}"]
                out.append(
                    f"| {r['rate']:g}/s | {name} | {x['requests']} | {x['us_per_request']} | "
                    f"{x['us_per_request_net_of_idle']} | {x['user_us_per_request']:.0f} / "
                    f"{x['system_us_per_request']:.0f} | "
                    f"{', '.join(f'{v:.0f}' for v in x['us_per_request_by_slice'])} | "
                    f"{x['client_start_lag_p99_ms']} | {x['redis_us_per_request']} |"
                )
        out.append("")
        for r in c["by_rate"]:
            out.append(
                f"- {r['rate']:g}/s: a miss costs {r['miss_extra_us']} µs ({r['miss_extra_pct_net']} %) more "
                f"gateway CPU with the cache on (net of idle; gross {r['miss_extra_pct_gross']} %; round by "
                f"round {r['miss_extra_pct_by_round']} %); target <= 10 %. An idle replica spent "
                f"{r.get('idle_replica_us_per_fill_elsewhere')} µs per fill made elsewhere (notices)."
            )
        out.append("")
    st = report.get("stage")
    if st:
        out += [
            f"## The cache stage in-process ({st['calls']} calls each)",
            "",
            "| call | µs CPU |",
            "|---|---|",
        ]
        out += [f"| {k} | {v} |" for k, v in st["us_per_call"].items()]
    return "\n".join(out)


SMOKE = {
    "requests": 80,
    "max_tokens": 8,
    "concurrency": 4,
    "hit_prompts": 10,
    "hit_samples": 30,
    "cpu_rates": "20,100",
    "cpu_slice_seconds": 1.0,
    "cpu_rounds": 1,
    "stage_calls": 200,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.cache", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--parts", default="dedup,latency,cpu,stage", help="comma-separated: dedup, latency, cpu, stage"
    )
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis for the cache")
    p.add_argument("--requests", type=int, default=2000, help="dedup: requests sent to each gateway")
    p.add_argument("--concurrency", type=int, default=32, help="dedup: clients sending back to back")
    p.add_argument("--dup-rate", type=float, default=0.2, help="dedup: share of requests repeating a prompt")
    p.add_argument("--seed", type=int, default=7, help="dedup: which requests repeat which")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    p.add_argument("--cpu-stream", action="store_true", help="cpu: streamed requests instead of plain ones")
    p.add_argument("--hit-prompts", type=int, default=100, help="latency: distinct stored answers")
    p.add_argument("--hit-samples", type=int, default=1000, help="latency: samples of each kind")
    p.add_argument(
        "--cpu-rates", default="50,300", help="cpu: requests per second (open loop), one run per rate"
    )
    p.add_argument("--cpu-slice-seconds", type=float, default=3.0, help="cpu: seconds per slice")
    p.add_argument("--cpu-rounds", type=int, default=2, help="cpu: rounds of 4 slices (on, off, off, on)")
    p.add_argument("--stage-calls", type=int, default=2000, help="stage: calls per measured function")
    p.add_argument("--smoke", action="store_true", help="a few seconds of each part (the smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON result")
    args = p.parse_args(argv)
    if args.smoke:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for name, value in SMOKE.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    if not 0 <= args.dup_rate < 1:
        p.error("--dup-rate must be in [0, 1)")
    if args.requests <= 2 * args.concurrency:
        p.error("--requests must exceed 2 x --concurrency (repeats need earlier prompts)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    parts = set(args.parts.split(","))
    tag = os.urandom(4).hex()
    prefix = f"bench:cache:{tag}:"
    # Answers of max_tokens tokens in about 0.05 + 0.01 x max_tokens seconds, as in `make bench`
    sim_flags = ["--ttft", "0.05", "--itl", "0.01", "--output-tokens", "64"]
    report: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "gateway_dirty": bool(git("status", "--porcelain", "gateway")),
        "machine": machine(),
        "settings": {
            "sim_flags": sim_flags,
            "key_prefix": prefix,
            "auth_and_limits": "on",
            "smoke": args.smoke,
            **{k: v for k, v in vars(args).items() if k not in ("out", "smoke")},
        },
    }
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        if parts & {"dedup", "latency", "cpu"}:
            stack = Stack(args.redis, sim_flags, prefix, replica="cpu" in parts)
            try:
                steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                    ("dedup", lambda: dedup(stack, args, tag)),
                    ("latency", lambda: latency(stack, args, prefix, tag)),
                    ("cpu", lambda: cpu(stack, args, tag)),
                ]
                for part, run in steps:
                    if part in parts:
                        p0 = time.perf_counter()
                        report[part] = run()
                        timings[part] = round(time.perf_counter() - p0, 1)
                if not stack.alive():
                    raise RuntimeError("a process died")
            finally:
                stack.stop()
        if "stage" in parts:
            p0 = time.perf_counter()
            report["stage"] = stage(args, prefix)
            timings["stage"] = round(time.perf_counter() - p0, 1)
    finally:
        report["deleted_keys"] = uvloop.run(purge(args.redis, prefix))
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["part_seconds"] = timings
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-smoke" if args.smoke else ""
    path = args.out / f"cache-{started.strftime('%Y%m%d-%H%M%S')}{suffix}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(render(report))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
