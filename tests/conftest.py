"""Shared fixtures: a simulator and a gateway in front of it, as real processes on loopback.

In CI (``CI=true``, as ``.ci/run`` sets it) or with ``--no-skips``, a skipped test is a failed
test: the suite skips only when a service it needs (Redis, a Prometheus binary) is missing, and
CI must not pass without the multi-replica rate-limit path or the scrape tests having run. CI also
sets ``REDIS_REQUIRED=1`` and ``PROMETHEUS_REQUIRED=1`` so those tests fail with their own message.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator, Iterator

import httpx
import openai
import pytest

from tests.procs import Gateway, Sim

# The services whose absence must fail CI, by the variable that makes their tests fail, not skip.
REQUIRED_IN_CI = ("REDIS_REQUIRED", "PROMETHEUS_REQUIRED")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-skips",
        action="store_true",
        default=False,
        help="report every skipped test as a failure (implied by CI=true)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if in_ci():
        for name in REQUIRED_IN_CI:
            os.environ.setdefault(name, "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    if not (in_ci() or item.config.getoption("--no-skips")):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped, and skips fail under CI=true / --no-skips: {reason}"


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    s = Sim(None, "--ttft", "0.02", "--itl", "0.005", "--embedding-model", "embed-small")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gateway(sim: Sim) -> Iterator[Gateway]:
    g = Gateway([sim.url])
    yield g
    g.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=30)
    yield c
    c.close()


@pytest.fixture
async def aclient(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=30)
    yield c
    await c.close()


@pytest.fixture
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        yield c
