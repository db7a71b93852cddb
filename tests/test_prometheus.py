"""A real Prometheus server scraping a real gateway: the series, their labels and values, as stored.

Prometheus is the binary from Debian's ``prometheus`` package, extracted (never installed, no
service started) the way ``scripts/lint-deploy.sh`` gets promtool: the copy lint-deploy left in
``.venv-deploy/promtool`` is used when present, else ``apt-get download prometheus`` +
``dpkg-deb -x`` into ``.cache/prometheus``; ``PROMETHEUS_BIN`` names another binary. When none can
be had the tests skip with the reason, or fail when ``PROMETHEUS_REQUIRED=1``.

Each test starts its own simulator, gateway (YAML config with API keys) and Prometheus on free
127.0.0.1 ports; Prometheus scrapes the gateway every second, evaluates the repository's alerting
rules (deploy/prometheus/alerts.yml) every second, and every process is stopped at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.jobs_helpers import PrivateRedis
from tests.procs import ROOT, Gateway, Proc, Sim, free_port, until, wait_http

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "dashboards" / "gateway-overview.json"
# Where lint-deploy extracts Debian's prometheus package (promtool and prometheus both), then ours.
PACKAGE_DIRS = (ROOT / ".venv-deploy" / "promtool", ROOT / ".cache" / "prometheus")
JOB = "llm-gateway"
UID = secrets.token_hex(3)
MSG = [{"role": "user", "content": "alpha beta gamma"}]


# ----------------------------------------------------------------------------- the binary


def _extract_prometheus() -> tuple[Path | None, str]:
    """Debian's prometheus package, extracted into .cache/prometheus (not installed)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None, "apt-get/dpkg-deb not available (not a Debian-based system)"
    dest = PACKAGE_DIRS[-1]
    with tempfile.TemporaryDirectory() as tmp:

        def download() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["apt-get", "download", "prometheus"], cwd=tmp, capture_output=True, text=True, timeout=300
            )

        got = download()
        if got.returncode != 0 and os.geteuid() == 0:  # no package lists yet: as lint-deploy does
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300, check=False)
            got = download()
        debs = sorted(Path(tmp).glob("prometheus_*.deb"))
        if got.returncode != 0 or not debs:
            return None, f"`apt-get download prometheus` failed: {(got.stderr or got.stdout).strip()[-300:]}"
        dest.mkdir(parents=True, exist_ok=True)  # dpkg-deb -x does not create missing parents
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(dest)], check=True, timeout=300)
    binary = dest / "usr" / "bin" / "prometheus"
    return (binary, "") if binary.is_file() else (None, f"{debs[0].name} holds no usr/bin/prometheus")


def find_prometheus() -> tuple[Path | None, str]:
    if os.environ.get("PROMETHEUS_BIN"):
        path = Path(os.environ["PROMETHEUS_BIN"])
        return (path, "") if os.access(path, os.X_OK) else (None, f"PROMETHEUS_BIN={path} is not executable")
    for d in PACKAGE_DIRS:
        if os.access(d / "usr" / "bin" / "prometheus", os.X_OK):
            return d / "usr" / "bin" / "prometheus", ""
    try:
        return _extract_prometheus()
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"extracting Debian's prometheus package failed: {exc}"


@pytest.fixture(scope="module")
def prometheus_bin() -> Path:
    path, why = find_prometheus()
    if path is None:
        message = (
            f"no Prometheus server binary: {why} "
            "(run `bash scripts/lint-deploy.sh` once, or set PROMETHEUS_BIN)"
        )
        if os.environ.get("PROMETHEUS_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


# ----------------------------------------------------------------------------- the server


class Prometheus:
    """A Prometheus server on a free loopback port, scraping {job: [targets]} every second."""

    def __init__(self, binary: Path, jobs: dict[str, list[str]], rule_files: Sequence[Path] = ()) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": targets, "labels": {"service": "llm-gateway"}}],
                }
                for job, targets in jobs.items()
            ],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc = Proc(
            [
                str(binary),
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            name="prometheus",
        )
        try:
            wait_http(self.url + "/-/ready", self.proc, timeout=30)
        except BaseException:
            self.stop()
            raise

    def api(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self.api("query", **params)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def values(self, expr: str, *by: str, at: float | None = None) -> dict[tuple[str, ...], float]:
        """{(label values of `by`): value} of an instant query."""
        return {tuple(r["metric"].get(k, "") for k in by): float(r["value"][1]) for r in self.query(expr, at)}

    def scalar(self, expr: str, at: float | None = None) -> float:
        """The single value of `expr` (0 when it has no result: a series not born yet)."""
        result = self.query(expr, at)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else 0.0

    def wait(self, expr: str, ok: Callable[[list[dict[str, Any]]], bool], timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if ok(result):
                return result
            time.sleep(0.25)
        raise AssertionError(f"{expr}: still {result} after {timeout}s\n{self.proc.output()[-2000:]}")

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- helpers


def dashboard_queries() -> Iterator[tuple[str, str]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for p in panels:
            for t in p.get("targets", []):
                yield p["title"], t["expr"]
            yield from walk(p.get("panels", []))

    yield from walk(json.loads(DASHBOARD.read_text())["panels"])


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def write_config(
    path: Path, keys: list[dict[str, Any]], tiers: dict[str, Any], teams: list[str], **sections: Any
) -> Path:
    cfg = {
        "auth": {"api_keys": keys},
        "tiers": tiers,
        "teams": {t: {} for t in teams},
        "rate_limits": {"storage": "memory://"},
        **sections,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def chat(client: httpx.Client, url: str, key: str, *, stream: bool = False, max_tokens: int = 3) -> int:
    body = {"model": "tiny", "messages": MSG, "max_tokens": max_tokens, "stream": stream}
    headers = {"authorization": f"Bearer {key}"}
    if not stream:
        return client.post(url, json=body, headers=headers).status_code
    with client.stream("POST", url, json=body, headers=headers) as r:
        for _ in r.iter_lines():
            pass
        return r.status_code


def started(stack: list[Any], make: Callable[[], Any]) -> Any:
    """Start a process and remember it, so the test's finally stops whatever was started."""
    proc = make()
    stack.append(proc)
    return proc


def stop_all(stack: list[Any]) -> None:
    for proc in reversed(stack):
        proc.stop()


@pytest.fixture
def stack() -> Iterator[list[Any]]:
    procs: list[Any] = []
    yield procs
    stop_all(procs)


# ----------------------------------------------------------------------------- the tests


def test_prometheus_stores_the_gateway_series(prometheus_bin: Path, tmp_path: Path, stack: list[Any]) -> None:
    main_key, limited_key = f"sk-{UID}-main", f"sk-{UID}-limited"
    config = write_config(
        tmp_path / "gateway.yaml",
        [
            {"sha256": key_hash(main_key), "subject": f"{UID}-main", "team": "search", "tier": "wide"},
            {"sha256": key_hash(limited_key), "subject": f"{UID}-limited", "team": "search", "tier": "rpm2"},
        ],
        {"wide": {"requests_per_minute": 1000}, "rpm2": {"requests_per_minute": 2}},
        ["search"],
    )
    sim = started(stack, lambda: Sim(None, "--ttft", "0.02", "--itl", "0.005"))
    gw = started(stack, lambda: Gateway([sim.url], config=config))
    gw_target = f"127.0.0.1:{gw.port}"
    sim_target = f"127.0.0.1:{sim.port}"
    prom = started(
        stack, lambda: Prometheus(prometheus_bin, {JOB: [gw_target], "vllm": [sim_target]}, [ALERTS])
    )
    prom.wait(f'up{{job="{JOB}"}} == 1', lambda r: len(r) == 1)  # scraped before any traffic
    before = time.time()
    url = gw.v1 + "/chat/completions"

    with httpx.Client(timeout=30) as c:
        plain = [chat(c, url, main_key) for _ in range(5)]
        streams = [chat(c, url, main_key, stream=True) for _ in range(4)]
        bad = [
            c.post(url, content=b"{not json", headers={"authorization": f"Bearer {main_key}"}).status_code
            for _ in range(3)
        ]
        limited = [chat(c, url, limited_key) for _ in range(4)]
    assert plain == [200] * 5 and streams == [200] * 4 and bad == [400] * 3
    assert limited == [200, 200, 429, 429]
    sent = len(plain) + len(streams) + len(bad) + len(limited)

    # Wait for a scrape that saw every request, then read everything at one instant.
    prom.wait(f'sum(gateway_requests_total{{job="{JOB}"}}) == {sent}', lambda r: len(r) == 1)
    now = time.time()

    # increase over the test = value now - value before the traffic (the series did not exist then)
    total = prom.scalar("sum(gateway_requests_total)", now) - prom.scalar(
        "sum(gateway_requests_total)", before
    )
    assert total == sent
    by_status = prom.values(
        "sum by (endpoint, model, status, stream) (gateway_requests_total)",
        *("endpoint", "model", "status", "stream"),
        at=now,
    )
    assert by_status == {
        ("chat", "tiny", "200", "false"): 7.0,
        ("chat", "tiny", "200", "true"): 4.0,
        ("chat", "unknown", "400", "false"): 3.0,
        ("chat", "tiny", "429", "false"): 2.0,
    }
    series = prom.query("gateway_requests_total", now)
    assert series
    # The route is known once the body parsed (a 400 for bad JSON has none); the backend once a
    # replica was chosen (the 429s were refused before that).
    route_backend = {"200": ("default", sim_target), "400": ("-", "-"), "429": ("default", "-")}
    for s in series:  # target labels from the scrape config, the gateway's own labels, nothing else
        m = s["metric"]
        assert (m["job"], m["instance"], m["service"]) == (JOB, gw_target, "llm-gateway")
        own = {"endpoint", "model", "route", "backend", "status", "stream"}
        assert set(m) == {"__name__", "job", "instance", "service", *own}
        assert (m["route"], m["backend"]) == route_backend[m["status"]], m

    # Time to first token: one observation per stream, plausible against the simulator's 20 ms.
    assert prom.values("gateway_time_to_first_token_seconds_count", "endpoint", "model", at=now) == {
        ("chat", "tiny"): 4.0
    }
    les = {s["metric"]["le"] for s in prom.query("gateway_time_to_first_token_seconds_bucket", now)}
    assert {"0.025", "0.05", "1.0", "+Inf"} <= les
    p50 = prom.scalar(
        "histogram_quantile(0.5, sum by (le) (gateway_time_to_first_token_seconds_bucket))", now
    )
    # Seconds, not milliseconds: no first token comes sooner than the simulator's 20 ms, so the
    # median lies in or above the bucket (0.01, 0.025]. (No upper bound: that would be a latency
    # assertion, and the machine may be busy.)
    assert p50 >= 0.01
    assert prom.scalar("sum(gateway_inter_token_latency_seconds_count)", now) >= 4 * 2
    itl_mean = prom.scalar(
        "sum(gateway_inter_token_latency_seconds_sum) / sum(gateway_inter_token_latency_seconds_count)", now
    )
    assert itl_mean > 0
    # Every request has a duration; only those that reached vLLM (7 plain + 4 streams) the rest.
    assert prom.scalar("sum(gateway_request_duration_seconds_count)", now) == sent
    assert prom.scalar("sum(gateway_upstream_time_to_first_token_seconds_count)", now) == 11
    assert prom.scalar("sum(gateway_overhead_seconds_count)", now) == 11
    overhead = prom.scalar("sum(gateway_overhead_seconds_sum) / sum(gateway_overhead_seconds_count)", now)
    assert overhead > 0, f"mean time inside the gateway {overhead * 1000:.1f} ms"

    # Tokens by team (cost attribution): 11 answers of 3 completion tokens, all team search.
    assert prom.values("gateway_completion_tokens_total", "model", "team", at=now) == {
        ("tiny", "search"): 33.0
    }
    prompt = prom.values("gateway_prompt_tokens_total", "model", "team", at=now)
    assert set(prompt) == {("tiny", "search")} and prompt["tiny", "search"] >= 11

    # Rejections and errors, with their bounded labels.
    assert prom.values("gateway_ratelimit_rejections_total", "kind", "scope", at=now) == {
        ("requests", "principal"): 2.0
    }
    assert prom.values("gateway_errors_total", "endpoint", "reason", at=now) == {
        ("chat", "validation"): 3.0,
        ("chat", "rate_limited"): 2.0,
    }
    assert prom.scalar("gateway_ratelimit_storage_errors_total", now) == 0
    assert prom.scalar("sum(gateway_fallbacks_total)", now) == 0  # no fallback configured: no series

    # Gauges read at scrape time.
    backend = f"127.0.0.1:{sim.port}"
    assert prom.values("gateway_backend_up", "backend", at=now) == {(backend,): 1.0}
    assert prom.values("gateway_backend_state == 1", "backend", "state", at=now) == {
        (backend, "healthy"): 1.0
    }
    assert prom.values("gateway_backend_circuit_open", "backend", at=now) == {(backend,): 0.0}
    assert prom.values("gateway_backend_circuit_state == 1", "backend", "state", at=now) == {
        (backend, "closed"): 1.0
    }
    assert prom.values("gateway_backend_outstanding_requests", "backend", at=now) == {(backend,): 0.0}
    kv = prom.values("gateway_backend_kv_cache_usage_perc", "backend", at=now)
    assert set(kv) == {(backend,)} and 0.0 <= kv[backend,] <= 1.0
    for name in ("gateway_backend_num_requests_waiting", "gateway_backend_num_requests_running"):
        assert set(prom.values(name, "backend", at=now)) == {(backend,)}
    capacity = prom.values("gateway_pool_capacity", "model", at=now)
    assert set(capacity) == {("tiny",)} and capacity["tiny",] > 0
    assert prom.values("gateway_pool_in_flight", "model", at=now) == {("tiny",): 0.0}
    assert prom.scalar("sum(gateway_requests_in_flight)", now) == 0
    assert prom.scalar("sum(gateway_queue_depth)", now) == 0  # nothing waited (no series, or 0)
    build = prom.query("gateway_build_info", now)
    assert len(build) == 1 and build[0]["metric"]["version"] and len(build[0]["metric"]["config_hash"]) >= 8

    # No label anywhere carries a key, a subject or another per-request value.
    for s in prom.api("series", **{"match[]": '{__name__=~"gateway_.*"}', "start": before, "end": now}):
        for value in s.values():
            assert UID not in value and "sk-" not in value, s

    # Every query of the dashboard runs, and returns data unless nothing could produce it here.
    # rate() needs two samples of a series inside its window: wait for a second scrape.
    prom.wait(
        "min(count_over_time(gateway_requests_total[1m]))",
        lambda r: bool(r) and float(r[0]["value"][1]) >= 2,
    )
    # No fallback is configured here, nor the cache (its panels: the next test).
    no_data_expected = ("gateway_fallbacks_total", "gateway_cache_")
    for title, expr in dashboard_queries():
        promql = expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
        result = prom.query(promql)
        assert result or any(x in expr for x in no_data_expected), f"panel {title!r}: no data for {promql}"

    # The repository's alerting rules load and evaluate against real series, and none is active.
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    expected = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert {r["name"] for r in rules} == expected
    until(
        lambda: all(r["health"] == "ok" for g in prom.api("rules")["groups"] for r in g["rules"]), "rules ok"
    )
    assert prom.alerts() == []

    # The backend dies: up goes 0, the state says down, the pool has no capacity, alerts go pending.
    sim.proc.kill()
    prom.wait(f'gateway_backend_up{{backend="{backend}"}} == 0', lambda r: len(r) == 1)
    assert prom.values("gateway_backend_state == 1", "backend", "state") == {(backend, "down"): 1.0}
    prom.wait('gateway_pool_capacity{model="tiny"} == 0', lambda r: len(r) == 1)

    def pending() -> dict[str, dict[str, str]]:
        return {a["labels"]["alertname"]: a["labels"] for a in prom.alerts() if a["state"] == "pending"}

    want = {"GatewayBackendDown", "GatewayNoReadyReplica"}
    active = until(lambda: (p := pending()).keys() >= want and p, f"{want} pending", prom.alerts)
    assert active.get("GatewayBackendDown", {}).get("backend") == backend, prom.alerts()
    assert active["GatewayBackendDown"]["severity"] == "warning"
    assert active.get("GatewayNoReadyReplica", {}).get("severity") == "critical", prom.alerts()
    assert active["GatewayNoReadyReplica"]["job"] == JOB


def test_cache_panels_have_data_and_its_alert_watches_redis(
    prometheus_bin: Path, tmp_path: Path, stack: list[Any]
) -> None:
    """A gateway with the response cache on: every cache panel of the dashboard has data; when its
    Redis stops, requests still succeed and GatewayCacheUnavailable goes pending."""
    key = f"sk-{UID}-cache"
    redis_server = started(stack, lambda: PrivateRedis(tmp_path))
    redis_server.start()
    config = write_config(
        tmp_path / "gateway.yaml",
        [{"sha256": key_hash(key), "subject": f"{UID}-cache", "team": "search"}],
        {},
        ["search"],
        cache={"storage": redis_server.url, "key_prefix": f"test:prom:{UID}:", "retry_interval": 0.5},
    )
    sim = started(stack, lambda: Sim(None, "--ttft", "0", "--itl", "0"))
    gw = started(stack, lambda: Gateway([sim.url], config=config))
    prom = started(stack, lambda: Prometheus(prometheus_bin, {JOB: [f"127.0.0.1:{gw.port}"]}, [ALERTS]))
    prom.wait(f'up{{job="{JOB}"}} == 1', lambda r: len(r) == 1)
    url, headers = gw.v1 + "/chat/completions", {"authorization": f"Bearer {key}"}
    hits = 0

    def ask(c: httpx.Client, tag: str, temperature: float = 0.0, stream: bool = False) -> str:
        """The x-gateway-cache of a request that must succeed whatever the cache's state."""
        nonlocal hits
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"say {tag}"}], "max_tokens": 3}
        with c.stream(
            "POST", url, json={**body, "temperature": temperature, "stream": stream}, headers=headers
        ) as r:
            r.read()
            assert r.status_code == 200, r.text
            hits += r.headers["x-gateway-cache"] == "hit"
            return r.headers["x-gateway-cache"]

    def is_hit(c: httpx.Client, tag: str) -> Callable[[], bool]:
        return lambda: ask(c, tag) == "hit"

    def a_round(c: httpx.Client) -> None:
        """Misses, hits (plain and streamed) and a bypass, on prompts of their own."""
        for _ in range(3):
            tag = secrets.token_hex(4)
            assert ask(c, tag) == "miss"
            until(is_hit(c, tag), "a hit")  # the fill follows the response
            assert ask(c, tag, stream=True) == "hit"
            assert ask(c, tag, temperature=0.7) == "bypass"

    with httpx.Client(timeout=30) as c:
        # Two rounds a scrape apart, so that every counter rises inside the panels' rate window.
        a_round(c)
        prom.wait(f'sum(gateway_cache_requests_total{{result="hit"}}) == {hits}', lambda r: len(r) == 1)
        a_round(c)
        prom.wait(f'sum(gateway_cache_requests_total{{result="hit"}}) == {hits}', lambda r: len(r) == 1)

        for title, expr in dashboard_queries():
            if "gateway_cache_" in expr:
                promql = expr.replace("$__rate_interval", "1m")
                assert prom.query(promql), f"panel {title!r}: no data for {promql}"
        until(
            lambda: all(r["health"] == "ok" for g in prom.api("rules")["groups"] for r in g["rules"]),
            "rules ok",
        )
        assert prom.alerts() == []

        # Redis stops: every cacheable request is a bypass, none fails, and the alert goes pending.
        redis_server.stop()

        def cache_alert() -> list[dict[str, Any]]:
            assert {ask(c, secrets.token_hex(4)) for _ in range(10)} == {"bypass"}
            return [a for a in prom.alerts() if a["labels"]["alertname"] == "GatewayCacheUnavailable"]

        active = until(cache_alert, "GatewayCacheUnavailable pending", prom.alerts, timeout=60)
    assert active[0]["labels"]["instance"] == f"127.0.0.1:{gw.port}"
    assert active[0]["state"] == "pending" and active[0]["labels"]["severity"] == "warning"


def test_series_stay_bounded_with_300_principals(
    prometheus_bin: Path, tmp_path: Path, stack: list[Any]
) -> None:
    """300 API keys, most on teams the config does not know: no series per key, team or request."""
    configured = ["alpha", "beta"]

    def team_of(i: int) -> str | None:
        return {0: "alpha", 1: "beta", 2: None}.get(i % 10, f"{UID}-unlisted-{i}")

    keys = [f"sk-{UID}-{i:03d}" for i in range(300)]
    config = write_config(
        tmp_path / "gateway.yaml",
        [
            {"sha256": key_hash(k), "subject": f"{UID}-user-{i}", "team": team_of(i)}
            for i, k in enumerate(keys)
        ],
        {},
        configured,
    )
    sim = started(stack, lambda: Sim(None, "--ttft", "0", "--itl", "0"))
    gw = started(stack, lambda: Gateway([sim.url], config=config))
    prom = started(stack, lambda: Prometheus(prometheus_bin, {JOB: [f"127.0.0.1:{gw.port}"]}))
    url, metrics_url = gw.v1 + "/chat/completions", gw.url + "/metrics"

    def scrape(client: httpx.Client) -> tuple[str, float]:
        t0 = time.perf_counter()
        r = client.get(metrics_url)
        took = time.perf_counter() - t0
        r.raise_for_status()
        return r.text, took

    def series_of(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {
            (s.name, tuple(sorted(s.labels.items())))
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def drive(indices: range, client: httpx.Client) -> list[int]:
        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(lambda i: chat(client, url, keys[i], stream=i % 3 == 0), indices))

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with httpx.Client(timeout=30, limits=limits) as c:
        # 30 principals covering every kind of team (configured, unconfigured, none) and both modes.
        assert drive(range(30), c) == [200] * 30
        text, _ = scrape(c)
        first = series_of(text)

        # 270 more principals while a scraper reads /metrics as fast as it answers.
        timings: list[tuple[int, float]] = []
        done = threading.Event()

        def scraper() -> None:
            with httpx.Client(timeout=30) as sc:
                while not done.is_set():
                    body, took = scrape(sc)
                    timings.append((len(body.encode()), took))

        t = threading.Thread(target=scraper)
        t.start()
        try:
            t0 = time.perf_counter()
            statuses = drive(range(30, 300), c)
            load_seconds = time.perf_counter() - t0
        finally:
            done.set()
            t.join(30)
        assert statuses == [200] * 270
        text, _ = scrape(c)
        idle = [scrape(c)[1] for _ in range(20)]
    after = series_of(text)

    # The series did not grow with 270 new principals and ~210 new teams (queue depth comes and
    # goes with load, so it is left out of the comparison).
    def steady(s: set[tuple[str, tuple[tuple[str, str], ...]]]) -> set[tuple[str, Any]]:
        return {x for x in s if not x[0].startswith("gateway_queue_depth")}

    assert steady(after) == steady(first), sorted(steady(after) ^ steady(first))
    teams = {dict(labels)["team"] for _, labels in after if "team" in dict(labels)}
    assert teams == {"alpha", "beta", "other", "none"}
    for name, labels in after:
        for value in dict(labels).values():
            assert UID not in value and "sk-" not in value, (name, labels)
    assert len(after) < 1000, f"{len(after)} series"

    # Prometheus stores the same: the team label has only bounded values, and every request counted.
    prom.wait("sum(gateway_requests_total) == 300", lambda r: len(r) == 1)
    stored = {r["metric"]["team"] for r in prom.query('{__name__=~"gateway_.*", team!=""}')}
    assert stored == {"alpha", "beta", "other", "none"}
    per_team = prom.values("sum by (team) (gateway_completion_tokens_total)", "team")
    assert sum(per_team.values()) == 300 * 3
    assert per_team["other",] == 210 * 3 and per_team["none",] == 30 * 3
    samples = prom.scalar(f'scrape_samples_scraped{{job="{JOB}"}}')
    prom_scrape = prom.scalar(f'max_over_time(scrape_duration_seconds{{job="{JOB}"}}[1m])')

    size = len(text.encode())
    under_load = [took for _, took in timings]
    sizes = [b for b, _ in timings]
    assert timings, "the scraper never completed a scrape during the load"
    ms = 1000
    print(
        f"\n/metrics after 300 principals: {size} bytes, {len(after)} series "
        f"(after the first 30 principals: {len(first)}); Prometheus scraped {samples:.0f} samples\n"
        f"scrape time idle: median {statistics.median(idle) * ms:.2f} ms, max {max(idle) * ms:.2f} ms "
        f"(20 scrapes)\n"
        f"scrape time under load ({len(under_load)} scrapes during {load_seconds:.1f} s of 270 requests, "
        f"32 at once): median {statistics.median(under_load) * ms:.2f} ms, "
        f"max {max(under_load) * ms:.2f} ms; {min(sizes)}-{max(sizes)} bytes\n"
        f"Prometheus' own scrape_duration_seconds, max over the last minute: {prom_scrape * ms:.2f} ms"
    )
    assert size < 200_000  # the scrape times above are printed, not asserted: benchmarks measure speed
