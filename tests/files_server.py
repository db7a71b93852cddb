"""A small app serving only the Files API, as a real uvicorn process for the Files API tests.

``python -m tests.files_server PORT SETTINGS_JSON``: the root Settings (auth, jobs, server) as
JSON; the listener is the gateway's own (gateway/server.py), so its body limits apply.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI

from gateway.api.router import install_error_handlers
from gateway.config import Settings
from gateway.jobs.files import Files
from gateway.jobs.files_api import build_files_router
from gateway.jobs.filestore import open_store
from gateway.pipeline.authenticate import Authenticator
from gateway.server import ListenerLimits, http_protocol


def build_app(settings: Settings) -> FastAPI:
    auth = Authenticator(settings)
    jobs = settings.jobs
    client = aioredis.Redis.from_url(jobs.queue)
    store = open_store(jobs.files)
    files = Files(jobs, client, store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await store.close()
        await client.aclose()

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(build_files_router(auth, files))
    return app


def main() -> None:
    port = int(sys.argv[1])
    settings = Settings(**orjson.loads(sys.argv[2]))
    s = settings.server
    uvicorn.run(
        build_app(settings),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=http_protocol(
            ListenerLimits(s.max_header_bytes, s.header_timeout, s.body_timeout, s.max_connections)
        ),
        log_level="warning",
    )


if __name__ == "__main__":
    main()
