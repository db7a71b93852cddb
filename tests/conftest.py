"""Shared fixtures: a simulator and a gateway in front of it, as real processes on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest

from tests.procs import Gateway, Sim


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
