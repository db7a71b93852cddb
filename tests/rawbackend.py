"""A raw-socket backend on 127.0.0.1 that speaks just enough vLLM: /health, /v1/models, then
whatever the test scripts for a POST (hostile streams, odd error bodies). Runs in a thread."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import orjson

MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "vllm", "max_model_len": 512}],
    }
)

# A POST handler gets the connected socket (request already read) and writes the whole answer.
Handler = Callable[[socket.socket], None]


def answer(conn: socket.socket, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    conn.sendall(
        b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
        % (status, content_type, len(body), body)
    )


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (vLLM streams with chunked transfer encoding)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
)


class RawBackend:
    def __init__(self, on_post: Handler) -> None:
        self.on_post = on_post
        self.posts = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                while True:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        got = conn.recv(65536)
                        if not got:
                            return
                        head += got
                    head, _, rest = head.partition(b"\r\n\r\n")
                    line = head.split(b"\r\n", 1)[0]
                    length = 0
                    for h in head.split(b"\r\n")[1:]:
                        name, _, value = h.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    method, path = line.split(b" ")[:2]
                    if method == b"POST":
                        self.posts += 1
                        self.on_post(conn)
                        return
                    body = MODELS if path == b"/v1/models" else b""
                    status = 200 if path in (b"/health", b"/v1/models") else 404
                    conn.sendall(
                        b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                        % (status, len(body), body)
                    )
        except OSError:
            return  # the gateway hung up on us: what hostile backends get

    def stop(self) -> None:
        self._stop = True
        self.sock.close()
