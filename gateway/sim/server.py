"""A vLLM OpenAI server stand-in: same endpoints, shapes, errors and metric names.

Pure ASGI on uvicorn (httptools, uvloop) so it costs little CPU and can
drive load tests. Faults come from ``--fault`` or, per request, from the
``x-sim-fault`` header: ``error``, ``status:CODE``, ``drop:N`` (cut the
connection after N tokens), ``error-event:N`` (vLLM's mid-stream error
event), ``hang``, ``hang-after:N``, ``slow-start:SECONDS``, ``die`` (the
process exits, like an engine death), ``usage:P,C`` (report those token counts).

Test hooks (not part of vLLM): ``GET /sim/stats`` (aborted request ids, i.e.
client disconnects including those during ``hang``; ``received``, the count of
generation requests that reached the simulator, valid or not; the last
requests) and ``POST /sim/control`` (change knobs live).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import deque
from collections.abc import MutableMapping
from typing import Any

import orjson

from gateway.asgi import Receive, Scope, Send, header
from gateway.sim import anthropic, engine
from gateway.sim.metrics import SimMetrics
from gateway.sim.options import SimConfig, config_from_args

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]


class Disconnected(Exception):
    pass


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.created = engine.now()
        self.metrics = SimMetrics(config.models[0], config.max_num_seqs)
        self.aborted: deque[str] = deque(maxlen=1000)
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)
        self.completed = 0
        self.received = 0  # generation requests that reached the simulator, valid or not
        self._slots = asyncio.Semaphore(config.max_num_seqs)
        self._rng = random.Random(config.seed)

    # ---------------------------------------------------------------- ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET":
            if path == "/health":
                status = 200 if self.is_ready() else 503
                await respond(send, status, b"", [])
                return
            if path == "/v1/models":
                if not self.is_loaded():
                    await respond(
                        send, 503, engine.error("Model is loading", "ServiceUnavailable", None, 503)
                    )
                    return
                cards = [
                    engine.model_card(m, self.config.max_model_len, self.created, self.config.weights)
                    for m in self.all_models()
                ]
                await respond(send, 200, orjson.dumps({"object": "list", "data": cards}))
                return
            if path == "/version":
                await respond(send, 200, orjson.dumps({"version": engine.VERSION}))
                return
            if path == "/metrics":
                await respond(
                    send,
                    200,
                    self.metrics.render(),
                    [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
                )
                return
            if path == "/sim/stats":
                await respond(send, 200, orjson.dumps(self.stats()))
                return
        elif method == "POST":
            if path == "/sim/control":
                body = await read_all(receive)
                unknown = self.config.update(orjson.loads(body or b"{}"))
                await respond(
                    send,
                    400 if unknown else 200,
                    orjson.dumps({"unknown": unknown, "config": self.config.__dict__}),
                )
                return
            if path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
                await self.generate(scope, receive, send, path)
                return
            if path == "/v1/messages":  # Anthropic's API, for external-fallback tests
                body = orjson.loads(await read_all(receive) or b"{}")
                self.received += 1
                key = header(scope, b"x-api-key")
                self.recent.append(
                    {
                        "path": path,
                        "x_api_key": key.decode() if key else None,
                        "body": body,
                        "authorization": None,
                    }
                )
                await anthropic.messages(send, body, self.config.itl)
                self.completed += 1
                return
        await respond(send, 404, b'{"detail":"Not Found"}')

    def is_loaded(self) -> bool:
        return time.monotonic() - self.started >= self.config.load_time

    def is_ready(self) -> bool:
        return self.is_loaded() and self.config.healthy

    def all_models(self) -> list[str]:
        return [*self.config.models, *self.config.embedding_models]

    def stats(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "aborted": list(self.aborted),
            "completed": self.completed,
            "received": self.received,
            "running": m.running,
            "waiting": m.waiting,
            "requests": list(self.recent),
        }

    # ---------------------------------------------------------- generation
    async def generate(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        cfg = self.config
        raw = await read_all(receive)
        self.received += 1
        rid_header = header(scope, b"x-request-id")
        auth = header(scope, b"authorization")
        fault = (header(scope, b"x-sim-fault") or b"").decode() or cfg.fault
        if cfg.api_key and auth != f"Bearer {cfg.api_key}".encode():
            await respond(send, 401, b'{"error":"Unauthorized"}')
            return
        if not self.is_loaded():
            await respond(send, 503, engine.error("Model is loading", "ServiceUnavailable", None, 503))
            return
        if path == "/v1/embeddings" and not cfg.embedding_models:
            # A generative vLLM does not mount /v1/embeddings at all.
            await respond(send, 404, b'{"detail":"Not Found"}')
            return
        media_type = (header(scope, b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if media_type != b"application/json":
            # vLLM's validate_json_request dependency, before the body is even parsed.
            message = "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"
            await respond(send, 400, engine.error(message, "Bad Request", None, 400))
            return
        body, problem = parse_json(raw)
        if problem is not None:
            await respond(send, 400, problem)
            return
        self.recent.append(
            {
                "path": path,
                "x_request_id": rid_header.decode() if rid_header else None,
                "authorization": auth.decode() if auth else None,
                "body": body,
            }
        )
        if fault == "die":
            os._exit(1)
        if (
            fault.startswith("status:")
            or fault == "error"
            or (cfg.error_rate and self._rng.random() < cfg.error_rate)
        ):
            code = int(fault.split(":", 1)[1]) if fault.startswith("status:") else 500
            await respond(
                send, code, engine.error("Simulated engine failure", "InternalServerError", None, code)
            )
            return
        if fault == "hang":
            # Accepted but never scheduled: the client (or gateway) can only give up,
            # which vLLM counts as an abort.
            await wait_disconnect(receive)
            self.aborted.append(rid_header.decode() if rid_header else engine.new_id("hang-"))
            self.metrics.finished["abort"] += 1
            return
        status, answer = self.check(body, path)
        if status != 200:
            await respond(send, status, answer)
            return
        body = {**body, "model": answer.decode()}  # the served name (vLLM fills in a missing model)
        if path == "/v1/embeddings":
            await self.embed(send, body)
            return
        await self.complete(scope, receive, send, body, path == "/v1/chat/completions", fault, rid_header)

    def check(self, body: Any, path: str) -> tuple[int, bytes]:
        """vLLM's own request checks, in its order, with its wording and status codes.

        Returns ``(200, served model name)`` when the request may run, else
        ``(status, error body)``.
        """
        cfg = self.config
        chat = path == "/v1/chat/completions"
        # 1. FastAPI/pydantic body validation (only the shapes the simulator relies on).
        if not isinstance(body, dict):
            return 400, engine.validation_error(
                "model_attributes_type",
                "body",
                "Input should be a valid dictionary or object to extract fields from",
                body,
            )
        required = "messages" if chat else "prompt" if path == "/v1/completions" else "input"
        if required not in body:
            return 400, engine.validation_error("missing", f"body.{required}", "Field required", body)
        if chat and not isinstance(body["messages"], list):
            return 400, engine.validation_error(
                "list_type", "body.messages", "Input should be a valid list", body["messages"]
            )
        # A "before" model validator, so it runs before the model check.
        if path != "/v1/embeddings" and body.get("stream_options") and not body.get("stream"):
            return 400, engine.vllm_validation_error(
                "Stream options can only be defined when `stream=True`.", "stream_options"
            )
        # 2. The model: a missing or empty name means the served model.
        model = body.get("model")
        served = cfg.embedding_models if path == "/v1/embeddings" else cfg.models
        if not model and served:
            model = served[0]
        if model not in served:
            aliases = ", ".join(served)
            message = f"The model `{model}` does not exist. Valid aliases: {aliases}."
            return 404, engine.error(message, "NotFoundError", "model", 404)
        if path == "/v1/embeddings":
            return 200, str(model).encode()
        # 3. Token budget (vLLM's TokenizeParams and its prompt length check).
        name = "max_tokens"
        if chat and body.get("max_completion_tokens") is not None:
            name = "max_completion_tokens"
        max_tokens = body.get(name)
        if isinstance(max_tokens, int) and max_tokens > cfg.max_model_len:
            return 400, engine.vllm_validation_error(
                f"{name}={max_tokens} cannot be greater than max_model_len={cfg.max_model_len}. "
                "Please request fewer output tokens.",
                name,
                max_tokens,
            )
        _, prompt_tokens = engine.prompt_words(body, chat)
        if prompt_tokens > cfg.max_model_len:
            prompt = body.get("prompt")
            token_ids = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)
            # vLLM's tokenizer stops at max_model_len + 1 tokens: "at least" that many.
            count = prompt_tokens if token_ids else min(prompt_tokens, cfg.max_model_len + 1)
            qualifier = "at least " if count == cfg.max_model_len + 1 else ""
            return 400, engine.vllm_validation_error(
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, your "
                f"prompt contains {qualifier}{count} input tokens, which exceeds this limit even "
                "without any output tokens. Please reduce the length of the input prompt.",
                "input_tokens",
                count,
            )
        return 200, str(model).encode()

    async def embed(self, send: Send, body: dict[str, Any]) -> None:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        data = []
        tokens = 0
        for i, item in enumerate(items):
            text = item if isinstance(item, str) else " ".join(map(str, item or []))
            tokens += max(1, len(text.split()))
            seed = sum(text.encode()) or 1
            vec = [((seed * (k + 1)) % 97) / 97.0 - 0.5 for k in range(16)]
            data.append({"index": i, "object": "embedding", "embedding": vec})
        await respond(
            send,
            200,
            orjson.dumps(
                {
                    "id": engine.new_id("embd-"),
                    "object": "list",
                    "created": engine.now(),
                    "model": body["model"],
                    "data": data,
                    "usage": {
                        "prompt_tokens": tokens,
                        "total_tokens": tokens,
                        "completion_tokens": 0,
                        "prompt_tokens_details": None,
                    },
                }
            ),
        )

    async def complete(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: dict[str, Any],
        chat: bool,
        fault: str,
        rid_header: bytes | None,
    ) -> None:
        cfg = self.config
        words, prompt_tokens = engine.prompt_words(body, chat)
        # vLLM's CompletionRequest has no max_completion_tokens (an extra field, ignored there)
        max_tokens = (body.get("max_completion_tokens") if chat else None) or body.get("max_tokens")
        limit = cfg.max_model_len - prompt_tokens
        if isinstance(max_tokens, int):
            limit = min(limit, max_tokens)
        n_out = max(0, min(cfg.output_tokens, limit))
        opts = body.get("stream_options") or {}
        gen = engine.Generation(
            rid=engine.new_id("chatcmpl-" if chat else "cmpl-"),
            model=body["model"],
            created=engine.now(),
            chat=chat,
            n=int(body.get("n") or 1),
            tokens=engine.tokens_for(words, n_out),
            prompt_tokens=prompt_tokens,
            finish_reason="length" if n_out == limit else "stop",
            include_usage=bool(opts.get("include_usage")),
            # vLLM: continuous usage stats only count when include_usage is on too.
            continuous_usage=bool(opts.get("include_usage")) and bool(opts.get("continuous_usage_stats")),
        )
        if fault.startswith("usage:"):  # usage:PROMPT,COMPLETION reported whatever was generated
            p_s, _, c_s = fault[6:].partition(",")
            gen.reported = (int(p_s), int(c_s or 0))
        request_id = rid_header.decode() if rid_header else gen.rid
        stream = bool(body.get("stream"))
        m = self.metrics
        gone = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(_watch(receive, gone))
        start = time.monotonic()
        outcome = "abort"
        m.waiting += 1
        try:
            await self._slots.acquire()
        except BaseException:
            watcher.cancel()
            raise
        finally:
            m.waiting -= 1
        m.running += 1
        try:
            outcome = await self._run(send, gen, stream, fault, gone, start)
        except Disconnected:
            outcome = "abort"
        finally:
            m.running -= 1
            self._slots.release()
            watcher.cancel()
            m.finished[outcome] = m.finished.get(outcome, 0) + 1
            m.prompt_tokens += prompt_tokens
            m.e2e.observe(time.monotonic() - start)
            if outcome == "abort":
                self.aborted.append(request_id)
            else:
                self.completed += 1

    async def _run(
        self, send: Send, gen: engine.Generation, stream: bool, fault: str, gone: asyncio.Event, start: float
    ) -> str:
        cfg, m = self.config, self.metrics
        ttft = float(fault.split(":", 1)[1]) if fault.startswith("slow-start:") else cfg.ttft
        drop_at = int(fault.split(":", 1)[1]) if fault.startswith("drop:") else -1
        error_at = int(fault.split(":", 1)[1]) if fault.startswith("error-event:") else -1
        hang_at = int(fault.split(":", 1)[1]) if fault.startswith("hang-after:") else -1
        if not stream:
            await _sleep(ttft + cfg.itl * max(0, gen.completion_tokens - 1), gone)
            m.ttft.observe(ttft)
            m.generation_tokens += gen.completion_tokens * gen.n
            await respond(send, 200, gen.response())
            return gen.finish_reason
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        if cfg.sse_framing != "vllm":
            send = _reframing(send, cfg.sse_framing)
        await _sleep(ttft, gone)
        m.ttft.observe(time.monotonic() - start)
        if gen.chat:  # a completion stream starts with its first token instead
            events = [gen.first_event(i) for i in range(gen.n)]
            await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})
        last = time.monotonic()
        for step in range(gen.completion_tokens):
            if step:
                await _sleep(cfg.itl, gone)
            if step == drop_at:
                raise ConnectionAbortedError("simulated mid-stream drop")  # uvicorn cuts the connection
            if step == hang_at:
                await _sleep(1e9, gone)
            if step == error_at:
                # vLLM renders a mid-stream GenerationError with json.dumps (spaced separators).
                err = json.dumps(
                    {
                        "error": {
                            "message": "Simulated engine error mid-stream",
                            "type": "InternalServerError",
                            "param": None,
                            "code": 500,
                        }
                    }
                ).encode()
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + err + b"\n\ndata: [DONE]\n\n",
                        "more_body": False,
                    }
                )
                return "error"
            now = time.monotonic()
            m.itl.observe(now - last)
            last = now
            m.generation_tokens += gen.n
            payload = b"".join(gen.token_event(i, step) for i in range(gen.n))
            await send({"type": "http.response.body", "body": payload, "more_body": True})
        tail = (gen.usage_event() if gen.include_usage else b"") + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        return gen.finish_reason


def _reframing(send: Send, framing: str) -> Send:
    """Re-frame vLLM's ``data: {json}\n\n`` events as another OpenAI-compatible server might."""

    def event(e: bytes) -> bytes:
        if framing == "bare":
            return b": ping\nevent: message\nid: 1\ndata:" + e[6:] + b"\n\n"
        eol = b"\r\n" if framing == "crlf" else b"\r"
        return e + eol + eol

    async def reframed(message: MutableMapping[str, Any]) -> None:
        body = message.get("body", b"")
        if body:
            message = {**message, "body": b"".join(event(e) for e in body.split(b"\n\n") if e)}
        await send(message)

    return reframed


async def _sleep(seconds: float, gone: asyncio.Event) -> None:
    if gone.is_set():
        raise Disconnected
    if seconds <= 0:
        return
    if seconds < 0.5:
        # Short waits (inter-token gaps): a plain sleep is far cheaper than
        # wait_for's task, and a disconnect is still noticed within one token.
        await asyncio.sleep(seconds)
        if gone.is_set():
            raise Disconnected
        return
    try:
        await asyncio.wait_for(gone.wait(), seconds)
    except TimeoutError:
        return
    raise Disconnected


async def _watch(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            gone.set()
            return


async def wait_disconnect(receive: Receive) -> None:
    gone = asyncio.Event()
    await _watch(receive, gone)


def parse_json(raw: bytes) -> tuple[Any, bytes | None]:
    """The body as FastAPI decodes it, or vLLM's 400 for a body that is not JSON."""
    if not raw:
        return None, engine.validation_error("missing", "body", "Field required", None)
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError:
        pass
    try:  # the stdlib is laxer (NaN, huge integers) and names the position like FastAPI
        return json.loads(raw), None
    except json.JSONDecodeError as exc:
        return None, engine.validation_error(
            "json_invalid", f"body.{exc.pos}", "JSON decode error", {}, {"error": exc.msg}
        )
    except (UnicodeDecodeError, RecursionError) as exc:
        ctx = {"error": str(exc)}
        return None, engine.validation_error("json_invalid", "body", "JSON decode error", {}, ctx)


async def read_all(receive: Receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


async def respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    head = [*(JSON if headers is None else headers), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def run_simulator(args: argparse.Namespace) -> int:
    """Serve until stopped; 0 on a clean stop, 3 (uvicorn's start-up failure) if it cannot listen.

    Prints ``{"event": "simulator listening", "host", "port"}`` on stdout once the socket is
    bound, so a script (scripts/run-dev.sh) can tell its own simulator from whatever else may
    already listen on the port.
    """
    import sys

    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                line = {"event": "simulator listening", "host": args.host, "port": args.port}
                sys.stdout.write(orjson.dumps(line).decode() + "\n")
                sys.stdout.flush()

    sim = Simulator(config_from_args(args))
    config = uvicorn.Config(
        sim,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        server_header=True,
        timeout_keep_alive=75,
    )
    server = Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 3
