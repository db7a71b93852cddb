"""A raw-socket backend that speaks just enough vLLM for the gateway, and misbehaves on POST.

It answers the gateway's poller (``/health`` 200, ``/v1/models`` listing ``tiny``, ``/metrics``
404) like vLLM, on keep-alive connections; what a POST gets is the test's ``on_post``
coroutine, which writes raw bytes. Runs its own event loop in a thread, so tests drive the
gateway (a real process) synchronously while the backend keeps serving.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

MODELS = orjson.dumps({"object": "list", "data": [{"id": "tiny", "object": "model", "max_model_len": 512}]})


@dataclass
class Post:
    path: str
    body: dict[str, Any]
    connection: int  # 1 for the first connection the gateway opened, 2 for the next, ...

    @property
    def prompt(self) -> str:
        content: str = self.body["messages"][-1]["content"]
        return content

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


OnPost = Callable[[Post, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def chat_json(content: str) -> bytes:
    """A whole non-streamed chat completion response, as vLLM frames it (Content-Length)."""
    body = orjson.dumps(
        {
            "id": "chatcmpl-raw",
            "object": "chat.completion",
            "created": 1,
            "model": "tiny",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def chat_stream_events(content: str) -> list[bytes]:
    """The SSE events of a streamed chat completion, ending with ``data: [DONE]``."""

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        event = {
            "id": "chatcmpl-raw",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "tiny",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(event) + b"\n\n"

    return [
        chunk({"role": "assistant", "content": ""}, None),
        chunk({"content": content}, None),
        chunk({}, "stop"),
        b"data: [DONE]\n\n",
    ]


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunked(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


def chat_stream(content: str) -> bytes:
    """A whole streamed chat completion response, as vLLM frames it (chunked, one event a chunk)."""
    return STREAM_HEAD + b"".join(chunked(e) for e in chat_stream_events(content)) + b"0\r\n\r\n"


def chat_answer(post: Post, content: str) -> bytes:
    return chat_stream(content) if post.stream else chat_json(content)


class RawVllm:
    """The backend on a free 127.0.0.1 port; ``stop()`` ends it."""

    def __init__(self, on_post: OnPost) -> None:
        self.on_post = on_post
        self.posts: list[Post] = []
        self.connections = 0
        self.closed_by_peer = 0  # connections the gateway closed (EOF seen while reading)
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("raw backend did not start")
        assert self._server is not None
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url: str = f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll ``condition`` (read under the backend's lock) until true; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if condition():
                    return
            time.sleep(0.01)
        raise TimeoutError("condition not met in time")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
            number = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    with self.lock:
                        self.closed_by_peer += 1
                    return
                lines = head.split(b"\r\n")
                method, path, _ = lines[0].decode().split(" ", 2)
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if method == "GET":
                    writer.write(self._get(path))
                    await writer.drain()
                    continue
                post = Post(path, orjson.loads(body), number)
                with self.lock:
                    self.posts.append(post)
                await self.on_post(post, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _get(path: str) -> bytes:
        if path == "/health":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        if path == "/v1/models":
            return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
                len(MODELS),
                MODELS,
            )
        return b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
