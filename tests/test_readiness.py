"""/live, /ready and /health follow the backend: down, back, still loading."""

from __future__ import annotations

import time

import httpx

from tests.procs import Gateway, Sim


def wait_status(url: str, status: int, timeout: float = 10) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(url, timeout=5)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_ready_flips_when_backend_dies_and_returns() -> None:
    sim = Sim(None)
    gw = Gateway([sim.url])
    try:
        assert httpx.get(gw.url + "/ready").json()["status"] == "ready"
        sim.proc.kill()
        r = wait_status(gw.url + "/ready", 503)
        assert r.status_code == 503
        assert "down" in str(r.json()["reason"])
        assert httpx.get(gw.url + "/live").status_code == 200
        detail = httpx.get(gw.url + "/health").json()["backends"][0]
        assert detail["state"] == "down"
        assert detail["last_check"] is not None
        # Requests get a clean 503 with Retry-After while nothing is ready.
        r = httpx.post(
            gw.v1 + "/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 503
        assert r.headers["retry-after"]
        sim = Sim(sim.port)  # back on the same port
        assert wait_status(gw.url + "/ready", 200).status_code == 200
        assert httpx.get(gw.url + "/health").json()["backends"][0]["state"] == "healthy"
    finally:
        gw.stop()
        sim.stop()


def test_backend_still_loading_is_not_ready_and_not_down() -> None:
    sim = Sim(None, "--load-time", "8")  # long enough to outlast a slow gateway start
    gw = Gateway([sim.url], wait_ready=False)
    try:
        r = httpx.get(gw.url + "/ready")
        assert r.status_code == 503
        assert httpx.get(gw.url + "/health").json()["backends"][0]["state"] == "loading"
        assert wait_status(gw.url + "/ready", 200, timeout=20).status_code == 200
    finally:
        gw.stop()
        sim.stop()


def test_unhealthy_backend_flag() -> None:
    sim = Sim(None)
    gw = Gateway([sim.url])
    try:
        sim.control(healthy=False)
        assert wait_status(gw.url + "/ready", 503).status_code == 503
        assert "/health answered 503" in str(httpx.get(gw.url + "/ready").json()["reason"])
        sim.control(healthy=True)
        assert wait_status(gw.url + "/ready", 200).status_code == 200
    finally:
        gw.stop()
        sim.stop()


def test_ready_requires_the_configured_model() -> None:
    sim = Sim(None, "--model", "other")
    gw = Gateway(
        [], env={"GATEWAY_BACKENDS": f'[{{"url": "{sim.url}", "models": ["tiny"]}}]'}, wait_ready=False
    )
    try:
        # Wait for the first health check; before it the reason is only "not checked yet".
        deadline = time.monotonic() + 10
        while httpx.get(gw.url + "/health").json()["backends"][0]["last_check"] is None:
            assert time.monotonic() < deadline, "the backend was never checked"
            time.sleep(0.05)
        r = httpx.get(gw.url + "/ready")
        assert r.status_code == 503
        assert "tiny" in str(r.json()["reason"])
    finally:
        gw.stop()
        sim.stop()


def test_backend_that_never_comes_up_is_down_after_grace() -> None:
    sim = Sim(None)
    sim.proc.kill()
    gw = Gateway([sim.url], env={"GATEWAY_HEALTH__STARTUP_GRACE": "3"}, wait_ready=False)
    try:
        assert httpx.get(gw.url + "/health").json()["backends"][0]["state"] == "loading"
        deadline = time.monotonic() + 15
        state = "loading"
        while state == "loading" and time.monotonic() < deadline:
            time.sleep(0.2)
            state = httpx.get(gw.url + "/health").json()["backends"][0]["state"]
        assert state == "down"
    finally:
        gw.stop()
