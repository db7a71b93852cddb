"""The upstream HTTP/1.1 client (gateway/pipeline/upstream.py) against real servers on 127.0.0.1.

The gateway's own suites drive it through vLLM's simulator; these cover what the simulator
never does: bodies framed each way, a keep-alive connection the server drops as it is reused,
a slow reader, a stream whose closing chunk comes late, and TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.backends import Backend
from gateway.config import BackendSettings, ResilienceSettings, TimeoutSettings
from gateway.errors import UpstreamUnavailable
from gateway.pipeline.upstream import UpstreamClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    """A raw HTTP/1.1 server: ``handler(reader, writer, connection_number)`` per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def start(self, ssl_ctx: ssl.SSLContext | None = None) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_ctx)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return await reader.readexactly(length) if length else b""


def backend(url: str) -> Backend:
    return Backend.from_settings(BackendSettings(url=url), ResilienceSettings())


@contextlib.asynccontextmanager
async def serving(
    handler: Handler, ssl_ctx: ssl.SSLContext | None = None, base: str = "http://127.0.0.1"
) -> AsyncIterator[tuple[Server, UpstreamClient, Backend]]:
    """The server, a fresh client and the server as a backend; both closed at the end."""
    srv = Server(handler)
    port = await srv.start(ssl_ctx)
    client = UpstreamClient(TimeoutSettings())
    try:
        yield srv, client, backend(f"{base}:{port}")
    finally:
        await client.close()
        await srv.stop()


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


async def test_bodies_by_length_chunked_and_close_reuse_keep_alive() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await read_request(r)
            if body == b"chunked":
                w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                w.write(b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
            elif body == b"close":
                w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
                await w.drain()
                return
            else:
                w.write(answer(b'{"echo": "' + body + b'"}'))
            await w.drain()

    async with serving(handler) as (srv, client, b):
        got = []
        for body in (b"one", b"chunked", b"two", b"close", b"three"):
            resp = await client.post(b, b"/v1/x", body, "rid")
            got.append((resp.status, await resp.read()))
            resp.release()
        assert got == [
            (200, b'{"echo": "one"}'),
            (200, b"abcdefg"),
            (200, b'{"echo": "two"}'),
            (200, b"until the end"),
            (200, b'{"echo": "three"}'),
        ]
        # One connection for the first four (the fourth ended it), a new one for the fifth.
        assert srv.connections == 2


async def test_stale_keep_alive_connection_is_retried_once_on_a_new_one() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(answer(b"first"))
        await w.drain()
        if n == 1:
            await read_request(r)  # the server gives up on this connection as the request arrives
            return
        while True:
            await read_request(r)
            w.write(answer(b"fresh"))
            await w.drain()

    async with serving(handler) as (srv, client, b):
        resp = await client.post(b, b"/v1/x", b"a", "rid")
        assert await resp.read() == b"first"
        resp.release()
        resp = await client.post(b, b"/v1/x", b"b", "rid")  # on the pooled, doomed connection
        assert await resp.read() == b"first"  # answered on a new connection
        assert srv.connections == 2


async def test_fresh_connection_closed_without_answer_is_unavailable() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)

    async with serving(handler) as (srv, client, b):
        with pytest.raises(UpstreamUnavailable, match="closed the connection before answering"):
            await client.post(b, b"/v1/x", b"a", "rid")
        assert srv.connections == 1  # not retried: nothing suggests a stale connection


async def test_slow_reader_gets_every_byte_of_a_large_body() -> None:
    blob = bytes(range(256)) * 8192  # 2 MiB, well over the client's read buffer high-water mark

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(blob))
        for i in range(0, len(blob), 65536):
            w.write(blob[i : i + 65536])
            await w.drain()

    async with serving(handler) as (_srv, client, b):
        resp = await client.post(b, b"/v1/x", b"", "rid")
        parts = []
        while chunk := await resp.read_chunk():
            parts.append(chunk)
            await asyncio.sleep(0.002)
        assert b"".join(parts) == blob


async def test_stream_released_at_done_is_pooled_when_its_closing_chunk_arrives() -> None:
    event = b"data: [DONE]\n\n"

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(r)
            w.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            w.write(b"%x\r\n%s\r\n" % (len(event), event))
            await w.drain()
            await asyncio.sleep(0.05)  # the closing chunk comes after the client saw [DONE]
            w.write(b"0\r\n\r\n")
            await w.drain()

    async with serving(handler) as (srv, client, b):
        for _ in range(3):
            resp = await client.post(b, b"/v1/x", b"{}", "rid")
            assert resp.content_type == "text/event-stream"
            assert await resp.read_chunk() == event
            resp.body_consumed()
            resp.release()
            await asyncio.sleep(0.1)
        assert srv.connections == 1


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_https_target_verified_against_trusted_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        body = await read_request(r)
        w.write(answer(b"tls " + body))
        await w.drain()

    async with serving(handler, server_ctx, "https://localhost") as (_srv, client, b):
        # Not trusted: the certificate is refused, and that is a clean upstream error.
        with pytest.raises(UpstreamUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            await client.post(b, b"/v1/x", b"a", "rid")
        # Trusted through the standard variable (as a private CA would be): served over TLS.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusting = UpstreamClient(TimeoutSettings())
        resp = await trusting.post(b, b"/v1/x", b"b", "rid")
        assert (resp.status, await resp.read()) == (200, b"tls b")
        resp.release()
        await trusting.close()
