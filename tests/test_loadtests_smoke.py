"""A few seconds of each load-test harness, so that `make bench` and the capacity run keep working.

Not benchmarks: nothing here asserts a speed. They check that the harnesses start their
processes on loopback, drive traffic through the gateway (auth and limits on) without a
failed request, stop everything they started and write a complete result file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], out: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    report: dict[str, object] = orjson.loads(files[0].read_bytes())
    return report


def test_bench_smoke(tmp_path: Path) -> None:
    report = _run(
        [
            "loadtests.bench",
            *("--duration", "1", "--extra-duration", "1", "--warmup", "0.2", "--client-runs", "0"),
        ],
        tmp_path,
    )
    phases = report["phases"]
    assert isinstance(phases, list)
    names = {p["name"] for p in phases}
    for target in ("gateway", "floor", "asgi"):
        assert f"plain/{target}" in names and f"stream-long/{target}" in names
    assert all(p["ok"] == p["requests"] > 0 for p in phases)
    cpu = report["summary"]["cpu"]  # type: ignore[index]
    for target in ("gateway", "floor", "asgi"):
        assert cpu[target]["us_per_plain_request"] > 0
    assert report["settings"]["auth_and_limits"] == "on"  # type: ignore[index]


def test_capacity_smoke(tmp_path: Path) -> None:
    report = _run(
        [
            "loadtests.capacity",
            *("--parts", "curve", "--targets", "gateway-1w", "--rates", "50", "--step-seconds", "1"),
        ],
        tmp_path,
    )
    (curve,) = report["curves"]  # type: ignore[misc]
    (step,) = curve["steps"]
    assert step["ok"] == step["requests"] > 0, step


def test_cache_smoke(tmp_path: Path) -> None:
    report = _run(["loadtests.cache", "--smoke"], tmp_path)
    dedup = report["dedup"]
    on, off = dedup["cache_on"], dedup["cache_off"]  # type: ignore[index]
    assert on["ok"] == off["ok"] == on["sent"], dedup
    # every hit is a request the simulator never saw; every miss (or bypass) one it did
    seen = on["cache_headers"]["miss"] + on["cache_headers"]["bypass"]
    assert on["cache_headers"]["hit"] > 0 and on["backend_received"] == seen, dedup
    assert off["backend_received"] == off["sent"], dedup
    assert report["latency"]["hit_ms"]["n"] > 0  # type: ignore[index]
    for rate in report["cpu"]["by_rate"]:  # type: ignore[index]
        assert rate["cache_on"]["cache_headers"]["hit"] == 0, rate  # unique prompts only
        assert rate["cache_off"]["ok"] == rate["cache_off"]["requests"], rate
    assert all(us > 0 for us in report["stage"]["us_per_call"].values())  # type: ignore[index]
    assert report["deleted_keys"] > 0  # type: ignore[operator]
