"""Single-flight waits of the cache stage, in process on real Redis: a waiter never spins on Redis
and never waits for what it could not use."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from gateway.app import create_app
from gateway.cache.entry import PLAIN, Entry
from gateway.cache.key import make_key
from gateway.config import load_settings
from gateway.pipeline.receive import CHAT, parse

URL = "redis://127.0.0.1:6379/0"


async def test_a_notified_waiter_that_cannot_use_the_entry_stops_waiting() -> None:
    prefix = f"test:waits:{secrets.token_hex(4)}:"
    digest = hashlib.sha256(b"sk-waits").hexdigest()
    settings = load_settings(
        None,
        auth={"api_keys": [{"sha256": digest, "subject": "svc", "team": "a"}]},
        teams={"a": {}},
        cache={"storage": URL, "key_prefix": prefix, "single_flight_wait": 5},
    )
    cache = create_app(settings).gateway.cache
    assert cache is not None
    await cache.start()
    r = aioredis.Redis.from_url(URL)
    try:
        principal = await create_app(settings).gateway.auth.authenticate(
            {"headers": [(b"authorization", b"Bearer sk-waits")]}
        )
        body: dict[str, Any] = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "temperature": 0,
        }
        req = parse(CHAT, orjson.dumps(body), settings.validation)
        key = make_key(prefix, principal, "team", "chat", "tiny", "", req.body)
        await r.set(key.lock, b"other:1:0", px=10_000)  # another replica's filler, priority 0
        old = Entry(PLAIN, time.time() - 100, 1, 1, b'{"choices":[]}').encode()
        loop = asyncio.get_running_loop()
        before = (await r.info("commandstats")).get("cmdstat_mget", {}).get("calls", 0)

        async def store_and_notify() -> None:
            await asyncio.sleep(0.3)  # the waiter is waiting by now
            await r.set(key.entry + "j", old, px=60_000)
            await r.publish(prefix + "n", key.digest + ":1")

        notifier = loop.create_task(store_and_notify())
        scope = {"headers": [(b"cache-control", b"max-age=10")]}
        look = await cache.lookup(scope, principal, "chat", "default", req, loop.time() + 60, 10)
        await notifier
        assert look.status == "miss" and not look.filler  # the entry is too old for max-age=10
        after = (await r.info("commandstats")).get("cmdstat_mget", {}).get("calls", 0)
        assert after - before <= 5  # a look per second at most, not a loop on Redis
        # max-age=0: nothing a filler stores could be young enough, so it does not wait at all
        n = (await r.info("commandstats")).get("cmdstat_mget", {}).get("calls", 0)
        zero = await cache.lookup(
            {"headers": [(b"cache-control", b"max-age=0")]},
            principal,
            "chat",
            "default",
            req,
            loop.time() + 60,
            10,
        )
        assert zero.status == "miss" and not zero.filler and not zero.waited
        assert (await r.info("commandstats")).get("cmdstat_mget", {}).get("calls", 0) == n
    finally:
        async for k in r.scan_iter(match=prefix + "*"):
            await r.delete(k)
        await r.aclose()
        await cache.close()
