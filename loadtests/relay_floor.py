"""The bare byte relay floor: about the least CPU a Python proxy hop can cost.

A uvloop TCP relay that pairs every client connection with one upstream
connection and copies bytes both ways as they arrive, without looking at
them: no HTTP parsing, no buffering beyond the transports' own, no logging.
It is a reference point, not a gateway: the benchmark reports the gateway's
CPU per request and per relayed chunk as a multiple of this relay's.

    python -m loadtests.relay_floor --port 9000 --upstream 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import uvloop


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection; ``peer`` is the transport of the other side."""

    def __init__(self, peer: asyncio.Transport | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.pending: list[bytes] = []  # client bytes that arrived before upstream was connected
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.can_write_eof():
            self.peer.write_eof()
        return True  # keep our write side open: the peer may still be answering

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None:
            self.peer.close()

    # Flow control: when our outgoing buffer fills, stop reading from the peer.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()


class _ClientSide(_Pipe):
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__()
        self._upstream = (upstream_host, upstream_port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        client = self.transport
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(lambda: _Pipe(client), *self._upstream)
        except OSError:
            client.close()
            return
        if self.closed:
            upstream.close()
            return
        self.peer = upstream
        if self.pending:
            upstream.write(b"".join(self.pending))
            self.pending.clear()


async def serve(port: int, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _ClientSide(upstream_host, upstream_port), host, port, reuse_address=True, backlog=1024
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.relay_floor", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    args = parser.parse_args(argv)
    up_host, _, up_port = args.upstream.rpartition(":")
    uvloop.run(serve(args.port, up_host, int(up_port), args.host))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
