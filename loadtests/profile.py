"""Where the gateway's CPU goes under the benchmark's load (``make profile``).

Starts the simulator and the gateway (auth and limits on, as ``make bench``) on
free 127.0.0.1 ports, drives open-loop plain or streamed requests at a fixed
rate for a bounded time, and samples the gateway with py-spy meanwhile
(``--native`` adds C frames). Prints the functions with the most samples, by
self time and by inclusive time, and writes py-spy's collapsed stacks (for
flamegraph tools or speedscope) next to the benchmark results.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

from loadtests.bench import ROOT, Child, auth_config, chat_body, free_port, new_session, open_loop, wait_http


async def drive(
    url: str, headers: dict[str, str], stream: bool, tokens: int, rate: float, seconds: float
) -> int:
    async with new_session(headers) as session:
        body = chat_body(tokens, stream)
        await open_loop(session, url + "/v1/chat/completions", body, stream, rate, 1.0)  # warm-up
        samples = await open_loop(session, url + "/v1/chat/completions", body, stream, rate, seconds)
    return sum(1 for s in samples if not s.ok)


def top(collapsed: Path, n: int) -> str:
    """The ``n`` frames with the most samples, by self and by inclusive count."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        count = int(count_s)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    out = [f"{total} samples"]
    for title, counter in (("self", own), ("inclusive", incl)):
        out.append(f"\nby {title}:")
        out += [f"{c / total:6.1%}  {f}" for f, c in counter.most_common(n)]
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("plain", "stream"), default="plain")
    p.add_argument("--rate", type=float, default=20.0, help="requests started per second (open loop)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of measured load")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--auth", choices=("on", "off"), default="on")
    p.add_argument("--native", action="store_true", help="py-spy --native: C frames too")
    p.add_argument("--sample-rate", type=int, default=1000, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    py = sys.executable
    sim_port, gw_port = free_port(), free_port()
    scratch = Path(tempfile.mkdtemp(prefix="profile-"))
    args.out.mkdir(parents=True, exist_ok=True)
    collapsed = args.out / f"profile-{time.strftime('%Y%m%d-%H%M%S')}-{args.kind}.txt"
    children: list[Child] = []
    try:
        sim = Child(
            "sim", [py, "-m", "gateway", "sim", "--port", str(sim_port), "--ttft", "0.05", "--itl", "0.01"]
        )
        children.append(sim)
        wait_http(f"http://127.0.0.1:{sim_port}/version", sim)
        gw_args = [py, "-m", "gateway", "serve", "--backend", f"http://127.0.0.1:{sim_port}"]
        env: dict[str, str] = {}
        headers: dict[str, str] = {}
        if args.auth == "on":
            config, env, headers = auth_config(scratch)
            gw_args += ["--config", str(config)]
        gw = Child("gateway", [*gw_args, "--port", str(gw_port)], env)
        children.append(gw)
        url = f"http://127.0.0.1:{gw_port}"
        wait_http(url + "/ready", gw)
        uvloop.run(drive(url, headers, args.kind == "stream", args.tokens, args.rate, 2.0))  # warm
        cmd = [spy, "record", "--pid", str(gw.pid), "--rate", str(args.sample_rate), "--format", "raw"]
        cmd += ["--output", str(collapsed), "--duration", str(int(args.duration) + 1), "--nonblocking"]
        if args.native:
            cmd.append("--native")
        spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        failed = uvloop.run(
            drive(url, headers, args.kind == "stream", args.tokens, args.rate, args.duration - 1)
        )
        _, err = spy_proc.communicate(timeout=args.duration + 60)
        if spy_proc.returncode != 0:
            print(f"py-spy failed: {err.decode()[-2000:]}", file=sys.stderr)
            return 1
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(top(collapsed, args.top))
    print(f"\n{failed} requests failed; collapsed stacks: {collapsed.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
