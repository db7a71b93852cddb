"""First benchmark: the vLLM simulator directly vs through the gateway (``make bench``).

Starts its own simulator, gateway and bare byte relay (loadtests/relay_floor.py)
on free 127.0.0.1 ports, drives them with an open-loop load (a fixed arrival
rate, independent of how fast answers come back) from an aiohttp client on
uvloop in this process, and stops every process by PID at the end.

Phases, each after a short unmeasured warm-up on fresh connections:

    plain/direct  plain/gateway  stream/direct  stream/gateway           --duration each
    stream-long/gateway + stream-short/gateway (alternating slices)      --extra-duration each
    plain/floor                                                          --extra-duration
    stream-long/floor + stream-short/floor (alternating slices)          --extra-duration each
    plain/asgi, stream-long/asgi + stream-short/asgi                     the same

Reports, gateway minus direct on the same settings: added latency (plain) and
added time to first content byte and to the end of the stream (streams), at
p50/p90/p99; gateway CPU (the whole process tree's on-CPU time from /proc:
schedstat's nanoseconds, with stat's utime+stime alongside) per plain
request, per stream and per relayed chunk, the last one from the two stream
phases that differ only in ``max_tokens`` (run in alternating slices so that
the machine's drifting load weighs on both alike); the same CPU figures for
the byte relay floor (loadtests/relay_floor.py) and the ASGI floor (uvicorn and the
gateway's upstream client with nothing in between, loadtests/asgi_floor.py), and the
gateway's as multiples of them; and the
client-side CPU per chunk of aiohttp vs httpx (loadtests/clients.py).

Results: a JSON file in loadtests/results/ and a Markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import importlib.metadata
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import uvloop
from jose import jwt as jose_jwt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtests" / "results"
DONE = b"data: [DONE]\n\n"
HEADERS = {"Content-Type": "application/json"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
QUANTILES = (50, 90, 99)
# A phase whose requests started this late (p99) had the client starved of CPU by other work on the
# machine: its latencies measure the machine, not the gateway.
NOISY_LAG_MS = 5.0


# ---------------------------------------------------------- auth and limits
BENCH_SECRET_ENV = "BENCH_JWT_SECRET"
UNLIMITED = 10**12


def auth_config(
    directory: Path, extra: dict[str, Any] | None = None
) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The issue's measuring configuration: JWT auth and per-principal and per-team limits
    (RPM, TPM, concurrency) on in-memory storage, set so high that they never refuse.

    Returns (config file, environment for the gateway, headers for the client).
    """
    secret = os.urandom(32).hex()
    limits = {"requests_per_minute": UNLIMITED, "tokens_per_minute": UNLIMITED}
    config = {
        "auth": {"jwt": {"algorithms": ["HS256"], "secret_env": BENCH_SECRET_ENV}},
        "tiers": {"bench": {**limits, "max_concurrent": 10**6}},
        "teams": {"bench": {"limits": limits}},
        "rate_limits": {"storage": "memory://"},
        **(extra or {}),
    }
    path = directory / "bench-auth.json"  # JSON is YAML
    path.write_bytes(orjson.dumps(config))
    now = int(time.time())
    claims = {"sub": "bench", "team": "bench", "tier": "bench", "iat": now, "exp": now + 24 * 3600}
    token = jose_jwt.encode(claims, secret, algorithm="HS256")
    return path, {BENCH_SECRET_ENV: secret}, {"Authorization": f"Bearer {token}"}


# ----------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Child:
    """A child process with its output in a temporary file; stopped by its PID."""

    def __init__(
        self, name: str, args: Sequence[str], env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.name = name
        fd, path = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
        self.log_path = Path(path)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                list(args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, **(env or {})},
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log_path.unlink(missing_ok=True)


def wait_http(url: str, child: Child, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n{child.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"status {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s ({last}):\n{child.tail()}")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return raw[raw.rindex(b")") + 2 :].decode().split()


@dataclass(frozen=True, slots=True)
class CpuReading:
    """CPU seconds of a process tree: user and system from /proc/PID/stat (clock ticks, 10 ms),
    and ``exact``, the nanosecond on-CPU time of every thread from /proc/PID/task/TID/schedstat."""

    user: float
    system: float
    exact: float

    def __sub__(self, other: CpuReading) -> CpuReading:
        return CpuReading(self.user - other.user, self.system - other.system, self.exact - other.exact)


def _tree(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents[int(entry)] = int(fields[1])
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def _schedstat(pid: int) -> tuple[float, float]:
    """(on-CPU, runnable-but-waiting) seconds summed over the process's live threads."""
    run = wait = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
            run += int(fields[0])
            wait += int(fields[1])
        except (OSError, IndexError, ValueError):
            pass
    return run / 1e9, wait / 1e9


def tree_cpu(root: int) -> CpuReading:
    """CPU time of ``root`` and every live descendant (stat also counts reaped children)."""
    user = system = 0
    exact = 0.0
    for pid in _tree(root):
        fields = _stat_fields(pid)
        if fields is not None:  # fields[11:15]: utime stime cutime cstime
            user += int(fields[11]) + int(fields[13])
            system += int(fields[12]) + int(fields[14])
        exact += _schedstat(pid)[0]
    return CpuReading(user / CLK_TCK, system / CLK_TCK, exact)


def runq_wait_seconds(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a CPU (contention)."""
    return _schedstat(pid)[1]


# ---------------------------------------------------------------------- load
@dataclass(slots=True)
class Sample:
    ok: bool
    lag: float  # how late the client started the request versus its scheduled time
    first: float | None  # streams: seconds to the first body bytes holding an SSE "data:" line
    total: float  # seconds to the complete answer
    chunks: int
    error: str | None = None


def chat_body(max_tokens: int, stream: bool) -> bytes:
    return orjson.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Tell me about load tests."}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    )


async def one_request(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: bool, at: float
) -> Sample:
    t0 = time.perf_counter()
    lag = t0 - at
    first: float | None = None
    chunks = 0
    try:
        async with session.post(url, data=body, headers=HEADERS) as resp:
            if stream:
                tail = b""
                while chunk := await resp.content.readany():
                    if first is None and b"data:" in chunk:
                        first = time.perf_counter() - t0
                    chunks += 1
                    tail = (tail + chunk)[-len(DONE) :]
                ok = resp.status == 200 and tail == DONE
            else:
                data = await resp.read()
                ok = resp.status == 200 and data.startswith(b"{")
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Sample(False, lag, first, time.perf_counter() - t0, chunks, f"{type(exc).__name__}: {exc}")
    total = time.perf_counter() - t0
    return Sample(ok, lag, first, total, chunks, None if ok else f"status {status} or no [DONE]")


async def open_loop(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: bool, rate: float, duration: float
) -> list[Sample]:
    """Start round(rate*duration) requests at fixed intervals, never waiting for answers.

    The client's garbage collector is off meanwhile: with every request's task kept until the
    end, its full collections took up to 100 ms at 1,000 requests/s (30 s), and each pause was
    counted into the latency of every request in flight (docs/benchmarks.md)."""
    count = max(1, round(rate * duration))
    start = time.perf_counter() + 0.005
    tasks: list[asyncio.Task[Sample]] = []
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for i in range(count):
            at = start + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(session, url, body, stream, at)))
        return await asyncio.gather(*tasks)
    finally:
        if collecting:
            gc.enable()


# -------------------------------------------------------------------- phases
@dataclass(frozen=True)
class PhaseSpec:
    kind: str  # "plain" | "stream"
    target: str  # "direct" | "gateway" | "floor"
    max_tokens: int
    duration: float
    label: str = ""

    @property
    def name(self) -> str:
        return f"{self.label or self.kind}/{self.target}"

    @property
    def stream(self) -> bool:
        return self.kind == "stream"


@dataclass
class PhaseResult:
    name: str
    kind: str
    target: str
    max_tokens: int
    rate: float
    duration_s: float
    wall_s: float
    requests: int
    ok: int
    errors: list[str]
    latency_ms: dict[str, float]  # plain: the answer; streams: the end of the stream
    ttft_ms: dict[str, float] | None  # streams: first content byte
    chunks_per_stream: float | None
    cpu_s: dict[str, float]  # per process tree, measured phase only: on-CPU time (schedstat)
    cpu_stat_s: dict[str, float]  # the same from /proc/PID/stat utime+stime (10 ms ticks)
    cpu_sys_s: dict[str, float]  # the system (kernel) part, from stat stime
    runq_wait_ms: dict[str, float]  # per process (and "client"): runnable but not running
    client_cpu_util: float  # this process's CPU time / wall time
    client_lag_ms: dict[str, float] = field(default_factory=dict)
    loadavg_1m: float = 0.0  # at the end of the phase
    slices: int = 1
    # CPU µs per request of each slice, per watched process, in the order they ran
    slice_cpu_us: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Slice:
    """One measured stretch of open-loop load, from the first request to the last answer."""

    samples: list[Sample]
    wall: float
    client_cpu: float
    cpu: dict[str, CpuReading]  # per watched process tree
    wait: dict[str, float]  # run-queue wait seconds per watched process and the client


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats_ms(values: Sequence[float]) -> dict[str, float]:
    out = {f"p{q}": percentile(values, q) * 1000 for q in QUANTILES}
    out["max"] = max(values) * 1000 if values else math.nan
    out["mean"] = sum(values) / len(values) * 1000 if values else math.nan
    return out


def new_session(headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        headers=headers,
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=60),
        auto_decompress=False,
    )


async def measure(
    session: aiohttp.ClientSession,
    url: str,
    spec: PhaseSpec,
    rate: float,
    duration: float,
    watch: dict[str, int],
) -> Slice:
    body = chat_body(spec.max_tokens, spec.stream)
    pids = {**watch, "client": os.getpid()}
    cpu0 = {name: tree_cpu(pid) for name, pid in watch.items()}
    wait0 = {name: runq_wait_seconds(pid) for name, pid in pids.items()}
    client0 = time.process_time()
    wall0 = time.perf_counter()
    samples = await open_loop(session, url + "/v1/chat/completions", body, spec.stream, rate, duration)
    wall = time.perf_counter() - wall0
    client = time.process_time() - client0
    cpu1 = {name: tree_cpu(pid) for name, pid in watch.items()}
    return Slice(
        samples=samples,
        wall=wall,
        client_cpu=client,
        cpu={name: cpu1[name] - cpu0[name] for name in watch},
        wait={name: runq_wait_seconds(pid) - wait0[name] for name, pid in pids.items()},
    )


def phase_result(spec: PhaseSpec, rate: float, slices: Sequence[Slice]) -> PhaseResult:
    samples = [x for sl in slices for x in sl.samples]
    wall = sum(sl.wall for sl in slices)
    good = [x for x in samples if x.ok]
    firsts = [x.first for x in good if x.first is not None]
    names = slices[0].cpu.keys()
    return PhaseResult(
        name=spec.name,
        kind=spec.kind,
        target=spec.target,
        max_tokens=spec.max_tokens,
        rate=rate,
        duration_s=spec.duration,
        wall_s=wall,
        requests=len(samples),
        ok=len(good),
        errors=sorted({x.error or "?" for x in samples if not x.ok})[:5],
        latency_ms=stats_ms([x.total for x in good]),
        ttft_ms=stats_ms(firsts) if spec.stream else None,
        chunks_per_stream=sum(x.chunks for x in good) / len(good) if spec.stream and good else None,
        cpu_s={n: sum(sl.cpu[n].exact for sl in slices) for n in names},
        cpu_stat_s={n: sum(sl.cpu[n].user + sl.cpu[n].system for sl in slices) for n in names},
        cpu_sys_s={n: sum(sl.cpu[n].system for sl in slices) for n in names},
        runq_wait_ms={n: sum(sl.wait[n] for sl in slices) * 1000 for n in slices[0].wait},
        client_cpu_util=sum(sl.client_cpu for sl in slices) / wall,
        client_lag_ms={
            "p99": percentile([x.lag for x in samples], 99) * 1000,
            "max": max(x.lag for x in samples) * 1000,
        },
        loadavg_1m=os.getloadavg()[0],
        slices=len(slices),
        slice_cpu_us={n: [sl.cpu[n].exact / len(sl.samples) * 1e6 for sl in slices] for n in names},
    )


async def warm_up(
    session: aiohttp.ClientSession, url: str, spec: PhaseSpec, rate: float, seconds: float
) -> None:
    """Unmeasured load: opens the keep-alive connections the measured load will reuse."""
    if seconds > 0:
        body = chat_body(spec.max_tokens, spec.stream)
        await open_loop(session, url + "/v1/chat/completions", body, spec.stream, rate, seconds)


async def run_phase(
    spec: PhaseSpec, url: str, rate: float, warmup: float, watch: dict[str, int], headers: dict[str, str]
) -> list[PhaseResult]:
    async with new_session(headers) as session:
        await warm_up(session, url, spec, rate, warmup)
        return [phase_result(spec, rate, [await measure(session, url, spec, rate, spec.duration, watch)])]


async def run_pair(
    a: PhaseSpec,
    b: PhaseSpec,
    url: str,
    rate: float,
    warmup: float,
    watch: dict[str, int],
    headers: dict[str, str],
    rounds: int = 2,
) -> list[PhaseResult]:
    """Two phases in alternating slices, A B B A per round, so drift in the machine's load
    (other work starting or stopping) weighs on both alike; their difference is what counts."""
    got: dict[str, list[Slice]] = {a.name: [], b.name: []}
    async with new_session(headers) as session:
        await warm_up(session, url, a, rate, warmup)
        for _ in range(rounds):
            for spec in (a, b, b, a):
                got[spec.name].append(
                    await measure(session, url, spec, rate, spec.duration / rounds / 2, watch)
                )
    return [phase_result(a, rate, got[a.name]), phase_result(b, rate, got[b.name])]


def run_client_comparison(sim_url: str, streams: int, concurrency: int, runs: int) -> list[dict[str, Any]]:
    """Each client in its own process, alternating, ``runs`` times each."""
    out: list[dict[str, Any]] = []
    for _ in range(runs):
        for client in ("aiohttp", "httpx"):
            args = [sys.executable, "-m", "loadtests.clients", "--client", client, "--url", sim_url]
            args += ["--streams", str(streams), "--concurrency", str(concurrency)]
            done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"loadtests.clients --client {client} failed:\n{done.stderr[-2000:]}")
            out.append(orjson.loads(done.stdout.strip().splitlines()[-1]))
    return out


# ------------------------------------------------------------------- summary
def _by_name(phases: Sequence[PhaseResult]) -> dict[str, PhaseResult]:
    return {p.name: p for p in phases}


def _added(over: PhaseResult, base: PhaseResult, metric: str) -> dict[str, float]:
    a = over.ttft_ms if metric == "ttft" else over.latency_ms
    b = base.ttft_ms if metric == "ttft" else base.latency_ms
    assert a is not None and b is not None
    return {f"p{q}": a[f"p{q}"] - b[f"p{q}"] for q in QUANTILES}


def _cpu_costs(ph: dict[str, PhaseResult], target: str, proc: str, long: int, short: int) -> dict[str, Any]:
    """CPU µs of ``proc`` per unit of work in the ``target`` phases.

    Raw figures are everything the process burnt during the phase, divided by
    the requests; "net" ones first take off its idle burn (background health
    polling), measured while the direct phases ran and the process had no traffic.
    """
    direct = [ph["plain/direct"], ph["stream/direct"]]
    idle_rate = sum(p.cpu_s[proc] for p in direct) / sum(p.wall_s for p in direct)

    def per_request(name: str, net: bool = False) -> float:
        p = ph[name]
        cpu = p.cpu_s[proc] - (idle_rate * p.wall_s if net else 0.0)
        return cpu / p.requests * 1e6

    def kernel_share(name: str) -> float:
        p = ph[name]
        return p.cpu_sys_s[proc] / p.cpu_stat_s[proc] if p.cpu_stat_s[proc] > 0 else math.nan

    stream = per_request(f"stream-long/{target}")
    stream_short = per_request(f"stream-short/{target}")
    chunk = (stream - stream_short) / (long - short)  # the idle share is the same per stream: it cancels
    stream_net = per_request(f"stream-long/{target}", net=True)
    return {
        "us_per_plain_request": per_request(f"plain/{target}"),
        "us_per_plain_request_net": per_request(f"plain/{target}", net=True),
        "us_per_stream": stream,
        "us_per_stream_net": stream_net,
        "us_per_short_stream": stream_short,
        "us_per_chunk": chunk,
        "us_per_chunk_by_round": _chunk_by_round(
            ph[f"stream-long/{target}"], ph[f"stream-short/{target}"], proc
        ),
        # includes the events that do not scale with max_tokens: role, usage, [DONE], end of body
        "us_per_stream_besides_token_events_net": stream_net - chunk * long,
        "idle_ms_per_s": idle_rate * 1000,
        "kernel_share_plain": kernel_share(f"plain/{target}"),
        "kernel_share_stream": kernel_share(f"stream-long/{target}"),
    }


def _chunk_by_round(a: PhaseResult, b: PhaseResult, proc: str) -> list[float]:
    """The per-chunk estimate of each A B B A round on its own: the spread shows the noise."""
    la, lb = a.slice_cpu_us[proc], b.slice_cpu_us[proc]
    tokens = a.max_tokens - b.max_tokens
    return [
        ((la[i] + la[i + 1]) - (lb[i] + lb[i + 1])) / 2 / tokens
        for i in range(0, min(len(la), len(lb)) - 1, 2)
    ]


def summarize(
    phases: Sequence[PhaseResult], long: int, short: int, clients: list[dict[str, Any]]
) -> dict[str, Any]:
    ph = _by_name(phases)
    gw = _cpu_costs(ph, "gateway", "gateway", long, short)
    floor = _cpu_costs(ph, "floor", "floor", long, short)
    asgi = _cpu_costs(ph, "asgi", "asgi", long, short)
    summary: dict[str, Any] = {
        "noisy_phases": [p.name for p in phases if p.client_lag_ms["p99"] > NOISY_LAG_MS],
        "added_ms": {
            "gateway": {
                "plain_latency": _added(ph["plain/gateway"], ph["plain/direct"], "latency"),
                "stream_ttft": _added(ph["stream/gateway"], ph["stream/direct"], "ttft"),
                "stream_total": _added(ph["stream/gateway"], ph["stream/direct"], "latency"),
            },
            "floor": {
                "plain_latency": _added(ph["plain/floor"], ph["plain/direct"], "latency"),
                "stream_ttft": _added(ph["stream-long/floor"], ph["stream/direct"], "ttft"),
                "stream_total": _added(ph["stream-long/floor"], ph["stream/direct"], "latency"),
            },
            "asgi": {
                "plain_latency": _added(ph["plain/asgi"], ph["plain/direct"], "latency"),
                "stream_ttft": _added(ph["stream-long/asgi"], ph["stream/direct"], "ttft"),
                "stream_total": _added(ph["stream-long/asgi"], ph["stream/direct"], "latency"),
            },
        },
        "cpu": {
            "gateway": gw,
            "floor": floor,
            "asgi": asgi,
            "gateway_over_floor": {
                k: gw[k] / floor[k] if floor[k] > 0 else math.nan
                for k in gw
                if k.startswith("us_per_") and isinstance(gw[k], float)
            },
            "gateway_over_asgi": {
                k: gw[k] / asgi[k] if asgi[k] > 0 else math.nan
                for k in gw
                if k.startswith("us_per_") and isinstance(gw[k], float)
            },
        },
    }
    if clients:
        for metric in ("cpu_us_per_chunk", "cpu_us_per_token_event", "cpu_us_per_stream"):
            per: dict[str, list[float]] = {}
            for c in clients:
                per.setdefault(c["client"], []).append(c[metric])
            entry: dict[str, Any] = {
                name: {"min": min(v), "median": percentile(v, 50), "runs": v} for name, v in per.items()
            }
            if "aiohttp" in per and "httpx" in per:
                entry["httpx_over_aiohttp"] = min(per["httpx"]) / min(per["aiohttp"])
            summary.setdefault("clients", {})[metric] = entry
    return summary


def _f(v: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    summary = report["summary"]
    lines = [
        f"## llm-gateway benchmark {report['started']} (commit {report['commit']}"
        + (", with uncommitted gateway changes" if report["gateway_uncommitted_changes"] else "")
        + (f", gateway from {report['gateway_src']}" if report["gateway_src"] != str(ROOT) else "")
        + ")",
        "",
        f"{report['machine']['nproc']} CPUs ({report['machine']['cpu_model']}); "
        f"open loop {s['rate']:g} req/s; simulator ttft {s['sim_ttft']:g}s, itl {s['sim_itl']:g}s, "
        f"{s['tokens']} tokens (short streams {s['short_tokens']})",
        "",
        "| phase | max_tokens | requests | ok | latency p50/p90/p99 ms | first byte p50/p90/p99 ms "
        "| CPU ms (gw / floor / asgi / sim) | client CPU | client lag p99 ms "
        "| run-queue wait ms (client / gw / floor / sim) | load 1m |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    noisy = set(summary["noisy_phases"])
    for p in report["phases"]:
        lat = "/".join(_f(p["latency_ms"][f"p{q}"]) for q in QUANTILES)
        ttft = "/".join(_f(p["ttft_ms"][f"p{q}"]) for q in QUANTILES) if p["ttft_ms"] else "-"
        cpu = " / ".join(f"{p['cpu_s'][k] * 1000:.0f}" for k in ("gateway", "floor", "asgi", "sim"))
        wait = " / ".join(_f(p["runq_wait_ms"][k], 0) for k in ("client", "gateway", "floor", "sim"))
        name = p["name"] + (" (noisy)" if p["name"] in noisy else "")
        lines.append(
            f"| {name} | {p['max_tokens']} | {p['requests']} | {p['ok']} | {lat} | {ttft} | {cpu} "
            f"| {p['client_cpu_util'] * 100:.0f}% | {_f(p['client_lag_ms']['p99'], 2)} "
            f"| {wait} | {p['loadavg_1m']:.1f} |"
        )
    if noisy:
        lines += [
            "",
            f"(noisy): client start lag p99 above {NOISY_LAG_MS:g} ms, other work on the machine "
            "starved this run; its percentiles (and the differences built on them) are suspect.",
        ]
    lines += ["", "Added by the hop (minus direct), ms:", ""]
    lines += ["| hop | metric | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for hop, metrics in summary["added_ms"].items():
        for metric, vals in metrics.items():
            row = " | ".join(_f(vals[f"p{q}"], 2) for q in QUANTILES)
            lines.append(f"| {hop} | {metric} | {row} |")
    cpu = summary["cpu"]
    lines += ["", "CPU per unit of work, µs:", ""]
    lines += [
        "| | gateway | byte relay floor | gateway / floor | ASGI floor | gateway / ASGI floor |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "us_per_plain_request": "per plain request",
        "us_per_plain_request_net": "per plain request, net of idle",
        "us_per_stream": f"per stream ({s['tokens']} tokens)",
        "us_per_stream_net": f"per stream ({s['tokens']} tokens), net of idle",
        "us_per_chunk": "per relayed chunk (token event)",
        "us_per_stream_besides_token_events_net": "per stream besides its token events, net of idle",
    }
    for key, label in labels.items():
        g, f, x = cpu["gateway"][key], cpu["floor"][key], cpu["gateway_over_floor"][key]
        a, xa = cpu["asgi"][key], cpu["gateway_over_asgi"][key]
        lines.append(f"| {label} | {_f(g, 0)} | {_f(f, 0)} | {_f(x)}x | {_f(a, 0)} | {_f(xa)}x |")
    g, f, a = cpu["gateway"], cpu["floor"], cpu["asgi"]
    rounds = [" / ".join(f"{v:.0f}" for v in c["us_per_chunk_by_round"]) for c in (g, f, a)]
    lines.append(f"| per chunk, each A B B A round alone | {rounds[0]} | {rounds[1]} | | {rounds[2]} | |")
    idle = [_f(c["idle_ms_per_s"], 2) for c in (g, f, a)]
    lines.append(f"| idle burn, ms CPU per s | {idle[0]} | {idle[1]} | | {idle[2]} | |")
    for key, label in (("kernel_share_plain", "plain"), ("kernel_share_stream", "streams")):
        lines.append(f"| kernel share of CPU, {label} | {g[key]:.0%} | {f[key]:.0%} | | {a[key]:.0%} | |")
    clients = summary.get("clients")
    if clients:
        lines += ["", "Upstream client alone, client-side CPU, µs (min / median of runs):", ""]
        lines += ["| | aiohttp | httpx | httpx / aiohttp |", "|---|---|---|---|"]
        names = {
            "cpu_us_per_chunk": "per chunk read",
            "cpu_us_per_token_event": "per token event",
            "cpu_us_per_stream": f"per stream ({s['tokens']} tokens)",
        }
        for metric, label in names.items():
            c = clients[metric]
            cells = [f"{_f(c[n]['min'])} / {_f(c[n]['median'])}" for n in ("aiohttp", "httpx")]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} | {_f(c['httpx_over_aiohttp'], 2)}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "versions": {
            "aiohttp": aiohttp.__version__,
            "httpx": httpx.__version__,
            "uvloop": importlib.metadata.version("uvloop"),
        },
    }


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


async def run_phases(
    steps: Sequence[tuple[PhaseSpec, ...]],
    urls: dict[str, str],
    rate: float,
    warmup: float,
    watch: dict[str, int],
    headers: dict[str, str],
) -> list[PhaseResult]:
    """Each step is one phase, or two run in alternating slices.

    ``headers`` go with every request to every target (the simulator and the floor ignore an
    Authorization header), so all targets read the same bytes."""
    results: list[PhaseResult] = []
    for step in steps:
        what = " + ".join(f"{spec.name} {spec.duration:g}s" for spec in step)
        print(f"  {what} at {rate:g}/s ...", file=sys.stderr, flush=True)
        url = urls[step[0].target]
        if len(step) == 2:
            got = await run_pair(step[0], step[1], url, rate, warmup, watch, headers)
        else:
            got = await run_phase(step[0], url, rate, warmup, watch, headers)
        for r in got:
            if r.ok < r.requests:
                print(f"    {r.name}: {r.requests - r.ok} failed: {r.errors}", file=sys.stderr, flush=True)
        results += got
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=20.0, help="requests started per second (open loop)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per direct/gateway phase")
    p.add_argument(
        "--extra-duration",
        type=float,
        default=None,
        help="seconds per stream-long, stream-short and plain/floor phase (default: half of --duration, "
        "at least 5)",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each phase")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens of plain requests and streams")
    p.add_argument("--short-tokens", type=int, default=8, help="max_tokens of the short streams")
    p.add_argument("--ttft", type=float, default=0.05, help="simulator: seconds to the first token")
    p.add_argument("--itl", type=float, default=0.01, help="simulator: seconds between tokens")
    p.add_argument(
        "--client-streams", type=int, default=150, help="streams of each length, client comparison"
    )
    p.add_argument("--client-runs", type=int, default=2, help="runs of each client (0 skips)")
    p.add_argument(
        "--auth",
        choices=("on", "off"),
        default="on",
        help="on: JWT auth and in-memory rate limits (never refusing), the issue's measuring setup; "
        "off: an open gateway",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON result")
    p.add_argument(
        "--gateway-src",
        type=Path,
        default=ROOT,
        help="source tree the gateway and simulator run from (default: this checkout); e.g. "
        "`git archive HEAD gateway | tar -x -C DIR` to measure a commit while the checkout is edited",
    )
    args = p.parse_args(argv)
    args.gateway_src = args.gateway_src.resolve()
    if args.extra_duration is None:
        args.extra_duration = max(5.0, args.duration / 2)
    if args.short_tokens >= args.tokens:
        p.error("--short-tokens must be below --tokens")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    # Read before the processes start: they import the code as it is now, whatever happens later.
    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "gateway")) if args.gateway_src == ROOT else None
    py = sys.executable
    sim_port, gw_port, floor_port, asgi_port = free_port(), free_port(), free_port(), free_port()
    urls = {
        "direct": f"http://127.0.0.1:{sim_port}",
        "gateway": f"http://127.0.0.1:{gw_port}",
        "floor": f"http://127.0.0.1:{floor_port}",
        "asgi": f"http://127.0.0.1:{asgi_port}",
    }
    # One simulator for every phase; it generates up to 2x --tokens and max_tokens picks the length.
    sim_flags = ["--ttft", str(args.ttft), "--itl", str(args.itl), "--output-tokens", str(args.tokens * 2)]
    long, short, d, d2 = args.tokens, args.short_tokens, args.duration, args.extra_duration
    steps = [
        (PhaseSpec("plain", "direct", long, d),),
        (PhaseSpec("plain", "gateway", long, d),),
        (PhaseSpec("stream", "direct", long, d),),
        (PhaseSpec("stream", "gateway", long, d),),
        (
            PhaseSpec("stream", "gateway", long, d2, label="stream-long"),
            PhaseSpec("stream", "gateway", short, d2, label="stream-short"),
        ),
        (PhaseSpec("plain", "floor", long, d2),),
        (
            PhaseSpec("stream", "floor", long, d2, label="stream-long"),
            PhaseSpec("stream", "floor", short, d2, label="stream-short"),
        ),
        (PhaseSpec("plain", "asgi", long, d2),),
        (
            PhaseSpec("stream", "asgi", long, d2, label="stream-long"),
            PhaseSpec("stream", "asgi", short, d2, label="stream-short"),
        ),
    ]
    children: list[Child] = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        # `python -m gateway` imports the package from its working directory first.
        src, src_env = args.gateway_src, {"PYTHONPATH": str(args.gateway_src)}
        headers: dict[str, str] = {}
        gw_env = dict(src_env)
        gw_config: list[str] = []
        if args.auth == "on":
            config, secret_env, headers = auth_config(scratch)
            gw_env.update(secret_env)
            gw_config = ["--config", str(config)]
        sim = Child("sim", [py, "-m", "gateway", "sim", "--port", str(sim_port), *sim_flags], src_env, src)
        children.append(sim)
        wait_http(urls["direct"] + "/version", sim)
        gw_args = [py, "-m", "gateway", "serve", *gw_config, "--backend", urls["direct"]]
        gw = Child("gateway", [*gw_args, "--port", str(gw_port)], gw_env, src)
        children.append(gw)
        floor_args = ["--port", str(floor_port), "--upstream", f"127.0.0.1:{sim_port}"]
        floor = Child("floor", [py, "-m", "loadtests.relay_floor", *floor_args])
        children.append(floor)
        asgi_args = ["--port", str(asgi_port), "--upstream", urls["direct"]]
        asgi = Child("asgi", [py, "-m", "loadtests.asgi_floor", *asgi_args], src_env)
        children.append(asgi)
        wait_http(urls["gateway"] + "/ready", gw)
        wait_http(urls["floor"] + "/version", floor)
        wait_http(urls["asgi"] + "/version", asgi)
        watch = {"gateway": gw.pid, "floor": floor.pid, "asgi": asgi.pid, "sim": sim.pid}
        print(
            f"benchmark: sim pid {sim.pid}, gateway pid {gw.pid}, floor pid {floor.pid}, asgi pid {asgi.pid}",
            file=sys.stderr,
        )
        phases = uvloop.run(run_phases(steps, urls, args.rate, args.warmup, watch, headers))
        clients: list[dict[str, Any]] = []
        if args.client_runs > 0:
            print("  client comparison: aiohttp vs httpx ...", file=sys.stderr, flush=True)
            clients = run_client_comparison(urls["direct"], args.client_streams, 20, args.client_runs)
        for child in children:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} died during the run:\n{child.tail()}")
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    report: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "gateway_src": str(args.gateway_src),
        "gateway_uncommitted_changes": dirty,
        "machine": machine(),
        "settings": {
            "rate": args.rate,
            "duration": d,
            "extra_duration": d2,
            "warmup": args.warmup,
            "tokens": long,
            "short_tokens": short,
            "sim_ttft": args.ttft,
            "sim_itl": args.itl,
            "sim_flags": sim_flags,
            "client_streams": args.client_streams,
            "client_runs": args.client_runs,
            "auth_and_limits": args.auth,
            "access_log": os.environ.get("GATEWAY_LOGGING__ACCESS_LOG", "default (on)"),
        },
        "phases": [asdict(p) for p in phases],
        "clients": clients,
        "summary": summarize(phases, long, short, clients),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(render(report))
    print(f"\nresults: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    failed = [p.name for p in phases if p.ok < p.requests]
    if failed:
        print(f"requests failed in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
