"""The request pipeline for proxied endpoints, as a pure ASGI app.

    authenticate → receive → route plan → limit → admit → route replica → call upstream
    → relay → account

Each stage lives in ``gateway/pipeline/<stage>.py``; this module only runs
them in order (numbered as in docs/architecture.md) and turns a ``GatewayError``
from any stage into an OpenAI-shaped response. Authentication runs on the
headers first, so an anonymous client cannot make the gateway parse a body.

Pure ASGI rather than a FastAPI route: Starlette's request/response objects
and StreamingResponse cost more CPU than the whole relay (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from random import getrandbits
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from gateway.asgi import Receive, Scope, Send, header, header_list
from gateway.auth.principal import Principal
from gateway.backends import Backend
from gateway.cache.stage import CacheOnlyMiss
from gateway.drain import CUT_GRACE
from gateway.errors import Fault, GatewayError, ShuttingDown, sse_error_event
from gateway.pipeline import receive as receive_stage
from gateway.pipeline.account import Accountant, plausible_usage
from gateway.pipeline.attempt import Deadlines, attempt
from gateway.pipeline.content_log import prompt_text
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.limit import NO_LIMITS, RateLimiter, Reservation
from gateway.pipeline.receive import ClientGone, Endpoint, ParsedRequest
from gateway.pipeline.relay import gateway_headers
from gateway.pipeline.route import RoutePlan, check_model, choose_backend
from gateway.retry import backoff

if TYPE_CHECKING:
    from gateway.app import Gateway

_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def request_id_from(scope: Scope) -> tuple[str, str]:
    """(id returned to the client, unique id sent upstream).

    A client's X-Request-Id is kept if it is short and plain; upstream always
    gets a unique id (a client may reuse its id, and vLLM keys requests by it).
    """
    unique = f"{getrandbits(64):016x}"  # unique, not secret: no getrandom() syscall per request
    given = header(scope, b"x-request-id")
    if given and len(given) <= 128 and _ID_CHARS.issuperset(given):
        rid = given.decode()
        return rid, f"{rid}.{unique}"
    return unique, unique


class ProxyEndpoint:
    def __init__(self, endpoint: Endpoint, gateway: Gateway, accountant: Accountant) -> None:
        self.endpoint = endpoint
        self.settings = gateway.settings
        self.pool = gateway.pool
        self.upstream = gateway.upstream
        self.auth = gateway.auth
        self.limiter = gateway.limiter
        self.drain = gateway.drain
        self.retry_budget = gateway.retry_budget
        self.admission = gateway.admission
        self.router = gateway.router
        self.fallback = gateway.fallback
        self.metrics = gateway.metrics
        self.itl = gateway.metrics.itl.labels(endpoint.name)
        self.in_flight = gateway.metrics.in_flight.labels(endpoint.name)
        self.accountant = accountant
        self.budgets = gateway.budgets
        self.cache = gateway.cache
        self.log_content_teams = {n for n, t in gateway.settings.teams.items() if t.log_content}
        self.capture_teams = {n for n, t in gateway.settings.teams.items() if t.capture}
        self.log = structlog.get_logger("gateway.proxy")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid, upstream_id = request_id_from(scope)
        await self._run(
            scope, receive, send, Exchange(rid, self.endpoint.name, time.perf_counter()), upstream_id
        )

    async def execute(
        self, principal: Principal, raw: bytes, sink: Send, rid: str, task_type: str | None
    ) -> Exchange:
        """Run a job line through the same pipeline, as ``principal``, answering into ``sink``.

        The seam through which async jobs (gateway/jobs/worker.py) reuse every stage: no
        authentication (the job's principal was authenticated at submission; its model is
        authorized again here), limits under the job's tier, admission at the job priority
        (below every interactive tier), routing, breakers, fallback, relay and account. ``sink``
        is an ASGI ``send`` (gateway/pipeline/sink.py) that keeps the response. Returns the
        request's record (status, reason, fault, tokens).
        """
        headers = [(b"content-length", str(len(raw)).encode())]
        if task_type is not None:
            headers.append((self.settings.routing.task_header.encode(), task_type.encode()))
        scope: Scope = {
            "type": "http",
            "method": "POST",
            "path": self.endpoint.path.decode(),
            "headers": headers,
        }
        ex = Exchange(rid, self.endpoint.name, time.perf_counter())
        ex.principal, ex.job = principal, True
        await self._run(scope, _job_receive(raw), sink, ex, rid)
        return ex

    async def _run(self, scope: Scope, receive: Receive, send: Send, ex: Exchange, upstream_id: str) -> None:
        loop = asyncio.get_running_loop()
        rid = ex.request_id
        deadline = loop.time() + self.settings.timeouts.total
        structlog.contextvars.bind_contextvars(request_id=rid)
        self.in_flight.inc()
        drain = self.drain
        task = asyncio.current_task()
        assert task is not None
        drain.tasks.add(task)  # the drain waits for it, and cuts it when its deadline passes
        try:
            try:
                if drain.draining:
                    raise _shutting_down(drain.retry_after())
                await self._handle(scope, receive, send, ex, upstream_id, deadline)
            finally:
                # From here on the drain's cut no longer reaches this request: answering an error
                # and settling the limits below are never interrupted by it.
                drain.tasks.discard(task)
        except GatewayError as exc:
            ex.reason = exc.reason
            ex.fault = exc.fault
            ex.error = exc.message
            ex.limited = getattr(exc, "limit", None)
            await self.send_error(send, ex, exc)
        except ClientGone:
            ex.disconnected = True
        except asyncio.CancelledError:
            if ex.disconnected:
                task.uncancel()  # our own disconnect watcher cancelled us: a normal ending
            elif drain.cutting:
                task.uncancel()  # the drain is over: end the request cleanly
                # Retry at once: the client's retry goes to another replica, this one is leaving.
                await self._cut(send, ex, _shutting_down(1))
            else:
                raise
        except Exception as exc:  # a bug: log it once, answer a clean 500
            ex.reason, ex.fault = "internal", Fault.GATEWAY
            ex.error = type(exc).__name__
            self.log.exception("internal error")
            await self.send_error(send, ex, GatewayError("Internal gateway error."))
        finally:
            self.in_flight.dec()
            plausible_usage(ex)
            if ex.reservation is not NO_LIMITS:
                await self.limiter.settle(ex.reservation, _tokens_used(ex, self.limiter))
            if ex.prompt_tokens is None and ex.upstream_sent is not None:
                _estimate_usage(ex, self.limiter)
            ex.finished = time.perf_counter()
            if ex.fault is Fault.BACKEND:
                self.log.warning("upstream failure", backend=ex.backend, reason=ex.reason, cause=ex.error)
            if ex.usage_implausible:
                self.log.warning(
                    "the backend reported more tokens than the request could use; estimated instead",
                    backend=ex.backend,
                    prompt_cap=ex.prompt_cap,
                    completion_cap=ex.completion_cap,
                )
            known = self.pool.known_model(ex.model)
            self.accountant.record(ex, known)
            if ex.cache_look is not None and self.cache is not None:
                self.cache.finish(ex, known)  # metrics; the fill runs in a task of its own
            structlog.contextvars.unbind_contextvars("request_id")

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ex: Exchange,
        upstream_id: str,
        total_deadline: float,
    ) -> None:
        s = self.settings
        # 1. authenticate: on the headers, before anything of the body is read (a job line runs
        # as the principal that submitted it)
        if ex.job:
            principal = ex.principal
        else:
            principal = ex.principal = await self.auth.authenticate(scope)
        # 2. receive
        length = header(scope, b"content-length")
        raw = await receive_stage.read_body(
            receive,
            int(length) if length and length.isdigit() else None,
            s.server.max_body_bytes,
            header_list(scope, b"content-encoding"),
        )
        req = receive_stage.parse(self.endpoint, raw, s.validation)
        # 3. route plan: task type and alias → the served model (replicas are picked below)
        dirty = s.routing.task_field in req.body
        ex.requested_model = req.model
        plan = self.router.plan(scope, req.body, req.model)
        ex.route = plan.name
        self.auth.authorize(principal, req.model, plan.model)
        if plan.model != req.model:
            req.body["model"] = req.model = plan.model
            dirty = True
        ex.model, ex.stream = req.model, req.stream
        # Bounds of the usage the backend may report (relay._read_usage): vLLM refuses a prompt
        # past the context, and generates at most the completion cap per sequence.
        context = self.pool.context_tokens(req.model)
        sequences = req.n
        if context and self.endpoint.name != "embeddings":  # an embeddings input list: no bound
            ex.prompt_cap = context * sequences
        cap = req.max_tokens if req.max_tokens is not None else context
        ex.completion_cap = cap * sequences if cap else 0
        if principal.team in self.log_content_teams:
            ex.capture, ex.prompt_text = [], prompt_text(req.body)
            if principal.team in self.capture_teams and isinstance(req.body.get("messages"), list):
                ex.messages = req.body["messages"]  # kept by the ledger (gateway/ledger/rows.py)
        ex.body_bytes = len(raw)
        # 3b. cache: a stored answer to the same request (gateway/cache/stage.py); never fails for
        # Redis' sake. A hit is limited as a request (its tokens only with cache.charge_tokens).
        cache = self.cache
        if cache is not None:
            priority = self._priority(ex)
            look = await cache.lookup(
                scope, principal, self.endpoint.name, plan.name, req, total_deadline, priority
            )
            # A hit is one only once served: a request refused at the limits (429) was not, for
            # the header, the metrics and the ledger's saved cost alike.
            ex.cache_look, ex.cache = look, look.status if look.entry is None else None
            if look.only_if_cached:
                raise CacheOnlyMiss(
                    "Cache-Control: only-if-cached, and no stored answer matches this request."
                )
            if look.entry is not None:
                if self.limiter.enabled:
                    entry = look.entry
                    cost = entry.prompt_tokens + entry.completion_tokens if cache.charge_tokens else 0
                    ex.reservation = await self.limiter.admit(principal, cost, s.timeouts.total)
                ex.cache = look.status
                await cache.serve(look, req, send, ex)
                return
            if look.store:
                ex.cache_tap, ex.cache_room = [], look.policy.max_bytes if look.policy else 0
        # 4. limit (settled in __call__, whatever happens next)
        # Only validated values the endpoint honours feed the estimates (receive.parse); they stand
        # in for vLLM's usage when it never arrives (_estimate_usage).
        ex.completion_budget = self.limiter.estimate(0, req.max_tokens, req.n)
        if self.limiter.enabled:
            estimate = self.limiter.estimate(len(raw), req.max_tokens, req.n)
            ex.reservation = await self.limiter.admit(principal, estimate, s.timeouts.total)
        if self.budgets is not None:  # the team's monthly budget (gateway/ledger/budget.py)
            remaining = await self.budgets.check(principal)
            if remaining:  # sent with the response, like the rate-limit headers
                res = ex.reservation
                ex.reservation = (
                    Reservation(headers=remaining)
                    if res is NO_LIMITS
                    else replace(res, headers=[*res.headers, *remaining])
                )
        if req.stream and not req.client_wants_usage:
            # Exact token accounting needs vLLM's usage chunk; relay strips it again. Without
            # include_usage vLLM ignores continuous_usage_stats: dropped, or usage would appear
            # on every chunk the client gets.
            opts: Any = req.body.get("stream_options") or {}
            opts = (
                {k: v for k, v in opts.items() if k != "continuous_usage_stats"}
                if isinstance(opts, dict)
                else {}
            )
            req.body["stream_options"] = {**opts, "include_usage": True}
            dirty = True
        if dirty:
            raw = orjson.dumps(req.body)  # once, and only when the gateway changed something
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        watcher = loop.create_task(_watch_disconnect(receive, ex, task))
        try:
            try:
                await self._admit_and_forward(req, plan, raw, upstream_id, send, ex, total_deadline)
            except GatewayError as exc:
                fb = self.fallback
                if (
                    fb is None
                    or ex.response_started
                    or not fb.worth_it(exc)
                    or not fb.allowed(principal, plan, req)
                ):
                    raise
                # The local pool cannot serve and this team's data may leave: the external provider.
                ex.fallback, ex.backend = exc.code, fb.backend.label
                # The provider's model has its own context: only max_tokens bounds its usage.
                ex.prompt_cap = 0
                ex.completion_cap = req.max_tokens * req.n if req.max_tokens else 0
                self.metrics.child(self.metrics.fallbacks, exc.code).inc()
                deadlines = Deadlines.for_attempt(loop.time(), s.timeouts.first_byte, total_deadline)
                await fb.forward(self.upstream, req, plan, upstream_id, send, ex, deadlines, s, self.itl)
        finally:
            watcher.cancel()

    async def _admit_and_forward(
        self,
        req: ParsedRequest,
        plan: RoutePlan,
        raw: bytes,
        upstream_id: str,
        send: Send,
        ex: Exchange,
        total_deadline: float,
    ) -> None:
        s = self.settings
        rs = s.routing
        principal = ex.principal
        self.retry_budget.deposit()
        # 5. admit: wait for capacity in the model's pool (or for a replica to finish loading)
        check_model(self.pool, req.model)
        queued = time.perf_counter()
        priority = self._priority(ex)
        slot = await self.admission.admit(req.model, principal.tier, principal.team, total_deadline, priority)
        ex.priority = priority
        ex.queue_wait = admitted = time.perf_counter()
        ex.queue_wait -= queued
        tried: tuple[Backend, ...] = ()
        loop = asyncio.get_running_loop()
        try:
            while True:
                # 6. route (a replica of the pool; retried on another one before the first byte)
                backend = choose_backend(
                    self.pool, req.model, tried, plan.affinity, rs.load_aware, rs.affinity_max_skew
                )
                ex.backend = backend.label
                # 7, 8. call upstream and relay, under the replica's breaker; each attempt has its
                # own first-byte deadline, counted from now (not from arrival: queueing is not the
                # backend's wait, and a retry does not inherit what the failed attempt spent).
                deadlines = Deadlines.for_attempt(loop.time(), s.timeouts.first_byte, total_deadline)
                try:
                    await attempt(
                        self.upstream, backend, req, raw, upstream_id, send, ex, deadlines, s, self.itl
                    )
                    return
                except GatewayError as exc:
                    if not self._may_retry(exc, ex, len(tried), total_deadline):
                        raise
                    tried = (*tried, backend)
                    try:
                        choose_backend(self.pool, req.model, tried)
                    except GatewayError:
                        raise exc from None  # no other replica: report the real failure
                    pause = backoff(len(tried) - 1, s.resilience.retry_backoff)
                    if loop.time() + pause >= total_deadline:
                        raise  # the total deadline would pass before the retry starts
                    self.log.info("retrying on another replica", backend=backend.label, cause=exc.code)
                    await asyncio.sleep(pause)
        finally:
            self.admission.release(slot, time.perf_counter() - admitted)
        # 9. account: in __call__'s finally, so failures are counted too

    def _priority(self, ex: Exchange) -> int:
        """The request's admission priority (lower is served first): a job line's, or its tier's."""
        return self.admission.job_priority if ex.job else self.admission.priority_of(ex.principal.tier)

    def _may_retry(self, exc: GatewayError, ex: Exchange, retries: int, total_deadline: float) -> bool:
        return (
            exc.retryable
            and not ex.response_started
            and retries < self.settings.resilience.retry_attempts
            and asyncio.get_running_loop().time() < total_deadline  # never past the total deadline
            and self.retry_budget.withdraw()
        )

    async def _cut(self, send: Send, ex: Exchange, exc: ShuttingDown) -> None:
        """End a request the drain cut (its task was cancelled wherever it was waiting).

        Every ASGI send writes whole SSE events or nothing (uvicorn writes after its flow-control
        wait), so the final error event follows complete events. A response whose last bytes were
        being written when the cut came (``completing``) gets nothing more: its status stands.
        The client gets ``CUT_GRACE`` seconds to take the answer; one that does not read is left
        to uvicorn, which closes the connection.
        """
        if ex.response_started and ex.completing:
            return
        ex.reason, ex.fault, ex.error = exc.reason, exc.fault, exc.message
        try:
            async with asyncio.timeout(CUT_GRACE):
                await self.send_error(send, ex, exc)
        except TimeoutError:
            pass

    async def send_error(self, send: Send, ex: Exchange, exc: GatewayError) -> None:
        if ex.disconnected:
            return
        if ex.response_started:
            # Headers are gone: the only honest signal left is a final SSE error event.
            ex.completing = True
            await send({"type": "http.response.body", "body": sse_error_event(exc), "more_body": False})
            return
        ex.status = exc.status
        ex.response_started = ex.completing = True
        body = exc.body()
        await send(
            {
                "type": "http.response.start",
                "status": exc.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", ex.request_id.encode()),
                    *gateway_headers(ex),
                    *ex.reservation.headers,
                    *exc.headers(),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _shutting_down(retry_after: int) -> ShuttingDown:
    return ShuttingDown("This gateway is shutting down; retry on another replica.", retry_after=retry_after)


def _tokens_used(ex: Exchange, limiter: RateLimiter) -> int:
    """Tokens to charge against the token budgets, also written to ``ex.tokens_charged``.

    vLLM's usage when it arrived. Nothing when the request never reached a backend, when the
    backend refused it (4xx: vLLM generated nothing), could not be reached, or failed before
    the client got anything (the backend's fault, not the caller's). A stream cut off before
    its usage chunk (disconnect, deadline, backend failure) is charged what it cost: the prompt
    estimate plus one token per relayed event. Otherwise, once a request was written to a
    backend, the reservation stands (it may have generated up to max_tokens).
    """
    p, c = ex.prompt_tokens, ex.completion_tokens
    if ex.cache == "hit":  # no GPU used: charged only when cache.charge_tokens says so
        used = ex.reservation.reserved_tokens
    elif isinstance(p, int):  # a backend's numbers, bounded: never a refund beyond the reservation
        used = max(0, p) + (max(0, c) if isinstance(c, int) else 0)
    elif ex.upstream_sent is None:
        used = 0  # never sent to a backend (refused by the gateway, queue full, no replica)
    elif ex.reason == "upstream_client_error":
        used = 0  # the backend refused it (4xx): nothing was generated
    elif ex.fault is Fault.BACKEND and not ex.events:
        used = 0  # unreachable, 5xx, broke off or silent before the client got a token
    elif ex.stream:
        used = limiter.estimate(ex.body_bytes, 0) + ex.events
    else:
        used = ex.reservation.reserved_tokens  # the backend may have done the work
    if ex.reservation.tokens:
        ex.tokens_charged = used
    return used


def _job_receive(raw: bytes) -> Receive:
    """An ASGI ``receive`` for a job line: its body, then nothing (a job has no client to leave)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.get_running_loop().create_future()  # waits until the request's task ends
        raise AssertionError("unreachable")

    return receive


def _estimate_usage(ex: Exchange, limiter: RateLimiter) -> None:
    """Tokens for a request whose usage vLLM never reported (the client left, a deadline or the
    backend cut it off), so the ledger, budgets and token metrics do not record it as free.

    The same estimate the token limits are charged (``_tokens_used``): the prompt from the body's
    size; a stream's completion is one token per relayed event (at least what the client got), a
    plain request's is its completion budget (vLLM may have generated up to it). Nothing when the
    backend refused the request (4xx) or failed before sending a token. Sets ``usage_estimated``.
    """
    if ex.reason == "upstream_client_error" or (ex.fault is Fault.BACKEND and not ex.events):
        return
    ex.prompt_tokens = limiter.estimate(ex.body_bytes, 0)
    ex.completion_tokens = ex.events if ex.stream else ex.completion_budget
    ex.usage_estimated = True


async def _watch_disconnect(receive: Receive, ex: Exchange, task: asyncio.Task[Any]) -> None:
    """Cancel the request's task when the client goes away.

    Cancelling unwinds the upstream call, which closes vLLM's connection, and
    vLLM aborts the generation and frees its KV cache.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if ex.completing:  # uvicorn also says "disconnect" once the response is complete
                return
            ex.disconnected = True
            task.cancel()
            return
