"""Process lifecycle: SIGTERM/SIGINT end in a clean exit with every log line written; `make run`
refuses to front a port it does not own.

Kubernetes and ECS stop containers with SIGTERM: the gateway must exit 0 after its drain, having
written its last log lines (and run its atexit handlers, which coverage also relies on).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.procs import ROOT, Gateway, Proc, Sim, free_port, wait_http

BIN = str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin")


def events(output: str) -> list[str]:
    found = []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                found.append(orjson.loads(line)["event"])
            except (orjson.JSONDecodeError, KeyError):
                continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_on_an_idle_gateway_is_a_clean_exit_with_every_log_line(sig: int) -> None:
    sim = Sim()
    gw = Gateway([sim.url])
    try:
        gw.proc.proc.send_signal(sig)
        assert gw.proc.proc.wait(30) == 0
        seen = events(gw.proc.output())
        for event in ("draining", "drain finished", "gateway stopped"):
            assert event in seen, seen[-8:]
        assert seen[-1] == f"Finished server process [{gw.proc.pid}]"
    finally:
        gw.stop()
        sim.stop()


def test_sigterm_with_several_workers_is_a_clean_exit_of_every_worker() -> None:
    sim = Sim()
    gw = Gateway([sim.url], "--workers", "2")
    try:
        # /ready answered by one worker says nothing of the other: wait until both have started.
        deadline = time.monotonic() + 30
        while events(gw.proc.output()).count("gateway started") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert events(gw.proc.output()).count("gateway started") == 2
        gw.proc.proc.send_signal(signal.SIGTERM)
        assert gw.proc.proc.wait(60) == 0
        seen = events(gw.proc.output())
        assert seen.count("gateway stopped") == 2, seen
        assert seen.count("drain finished") == 2, seen
    finally:
        gw.stop()
        sim.stop()


def test_simulator_says_when_it_listens() -> None:
    sim = Sim()
    try:
        first = [e for e in events(sim.proc.output()) if e == "simulator listening"]
        assert first == ["simulator listening"]
    finally:
        sim.stop()


def run_dev(sim_port: int, port: int) -> Proc:
    env = {"BIN": BIN, "SIM_PORT": str(sim_port), "PORT": str(port)}
    env.pop("GATEWAY_BACKENDS", None)
    return Proc(["bash", str(ROOT / "scripts" / "run-dev.sh")], env=env, name="run-dev")


def test_make_run_stops_with_a_clear_error_when_the_simulator_port_is_taken() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    port = free_port()
    proc = run_dev(taken, port)
    try:
        status = proc.proc.wait(60)
        out = proc.output()
        assert status == 1, out
        assert f"could not listen on 127.0.0.1:{taken}" in out
        assert "gateway on" not in out  # no gateway was started in front of the squatter
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/live", timeout=2)
    finally:
        proc.stop()
        holder.close()


def test_make_run_serves_then_stops_both_processes_on_sigterm() -> None:
    sim_port, port = free_port(), free_port()
    proc = run_dev(sim_port, port)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", proc)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=30,
        )
        assert r.status_code == 200
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
        deadline = time.monotonic() + 10
        closed = {sim_port: False, port: False}
        while time.monotonic() < deadline and not all(closed.values()):
            for p in closed:
                try:
                    with socket.create_connection(("127.0.0.1", p), timeout=1):
                        pass
                except OSError:
                    closed[p] = True
            time.sleep(0.05)
        assert closed == {sim_port: True, port: True}
    finally:
        proc.stop()
