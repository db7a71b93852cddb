"""The ASGI floor: uvicorn and the gateway's upstream client, with nothing in between.

A pure-ASGI app on the same uvicorn settings as the gateway (uvloop, httptools,
no access log, no proxy-headers layer) that forwards each POST's body with the
gateway's own ``UpstreamClient`` and relays the answer: plain bodies whole,
streams chunk by chunk as they arrive. No validation, auth, limits, routing,
admission, breakers, metrics or logs. It is a reference point, not a gateway:
what the gateway costs above it is what the pipeline's stages cost; what it
costs above the byte relay floor (relay_floor.py) is the ASGI server and the
HTTP parsing on both sides.

    python -m loadtests.asgi_floor --port 9001 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from gateway.backends import Backend
from gateway.config import BackendSettings, ResilienceSettings, TimeoutSettings
from gateway.pipeline.upstream import UpstreamClient


def build_app(upstream_url: str) -> Any:
    client = UpstreamClient(TimeoutSettings())
    backend = Backend.from_settings(BackendSettings(url=upstream_url), ResilienceSettings())

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await client.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] != "POST":  # the harness waits for /version
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        resp = await client.post(backend, scope["path"].encode(), body, "floor")
        headers = [(b"content-type", resp.content_type.encode())]
        if resp.content_type.startswith("text/event-stream"):
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            while chunk := await resp.read_chunk():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            data = await resp.read()
            headers.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            await send({"type": "http.response.body", "body": data})
        resp.release()

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.asgi_floor", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the backend's URL")
    args = parser.parse_args(argv)
    uvicorn.run(
        build_app(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
