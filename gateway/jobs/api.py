"""HTTP surface of the jobs: the Batch API, ``/v1/jobs``, and ``Prefer: respond-async``.

* ``POST /v1/batches``, ``GET /v1/batches`` (``after``, ``limit`` 1 to 100), ``GET /v1/batches/{id}``,
  ``POST /v1/batches/{id}/cancel``: OpenAI's Batch API (the Batch object).
* ``GET /v1/jobs/{id}``: a single job; once done its ``response`` holds ``status_code`` and the
  ``body`` a synchronous call would have returned. ``DELETE /v1/jobs/{id}`` cancels a job that
  has not started (queued, or waiting between attempts); 400 ``invalid_state`` for one running
  or ended.
* Any proxied endpoint with ``Prefer: respond-async`` (RFC 7240) is validated and authorized as
  a synchronous request would be, then answered ``202 Accepted`` with ``Location: /v1/jobs/{id}``
  and the job object (``Preference-Applied: respond-async``). ``Idempotency-Key`` (≤ 255
  printable characters) makes a retried submission return the same job.

Everything belongs to the principal (within its team) that created it: anyone else gets 404.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response
from redis.exceptions import RedisError

from gateway.api.router import GET_HEAD
from gateway.asgi import Receive, Scope, Send, header, header_list
from gateway.errors import GatewayError, InvalidRequest
from gateway.jobs.files_api import ascii_digits
from gateway.jobs.store import owner_key
from gateway.pipeline import receive as receive_stage
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.route import check_model
from gateway.proxy import request_id_from

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.jobs.service import Jobs
    from gateway.proxy import ProxyEndpoint


def install_jobs_error_handler(api: Any) -> None:
    """Redis unreachable on a jobs or files route: 503 ``jobs_unavailable`` with Retry-After."""
    from gateway.jobs.service import JobsUnavailable

    async def unavailable(_: Request, __: Exception) -> Response:
        exc = JobsUnavailable()
        headers = {k.decode(): v.decode() for k, v in exc.headers()}
        return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=headers)

    api.add_exception_handler(RedisError, unavailable)


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def wants_async(scope: Scope) -> bool:
    """Whether the request carries the ``respond-async`` preference (RFC 7240) in any of its
    Prefer headers. A header that does not even contain the word is not parsed (the hot path of
    every proxied request pays a substring test at most)."""
    return any(
        k == b"prefer" and b"respond-async" in v.lower() and "respond-async" in preferences(v)
        for k, v in scope["headers"]
    )


def preferences(value: bytes) -> set[str]:
    """The preference names of one Prefer header value (RFC 7240 section 2), lowercased:
    ``1#preference``, each ``token [ BWS "=" BWS word ] *( OWS ";" [ OWS parameter ] )``, a word
    a token or a quoted string. Parameters and values are not names, and a comma or semicolon
    inside a quoted string separates nothing."""
    names: set[str] = set()
    for preference in _split(value.decode("latin-1"), ","):
        head = _split(preference, ";")[0]
        name = head.partition("=")[0].strip().lower()
        if name:
            names.add(name)
    return names


def _split(text: str, separator: str) -> list[str]:
    """``text`` cut at each ``separator`` outside quoted strings (``\\`` escapes within one)."""
    parts: list[str] = []
    start, quoted, escaped = 0, False, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == separator:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def build_jobs_router(gw: Gateway, jobs: Jobs) -> APIRouter:
    router = APIRouter()
    auth = gw.auth

    async def owner(request: Request) -> str:
        return owner_key(await auth.authenticate(request.scope))

    @router.post("/v1/batches", summary="Create a batch (OpenAI Batch API)")
    async def create_batch(request: Request) -> Response:
        principal = await auth.authenticate(request.scope)
        if gw.budgets is not None:
            await gw.budgets.check(principal)  # a spent month: 429 now, not a 429 per line later
        length = header(request.scope, b"content-length")
        try:
            # Bounded and decoded like a proxied request's body (a Batch request is tiny JSON).
            raw = await receive_stage.read_body(
                request.receive,
                int(length) if length and length.isdigit() else None,
                gw.settings.server.max_body_bytes,
                header_list(request.scope, b"content-encoding"),
            )
        except receive_stage.ClientGone:
            return Response(status_code=400)  # nobody reads it; nothing was made
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
        return _json(await jobs.create_batch(principal, body))

    @router.api_route("/v1/batches", methods=GET_HEAD, summary="List your batches, newest first")
    async def list_batches(request: Request) -> Response:
        who = await owner(request)
        q = request.query_params
        limit_raw = q.get("limit", "20")
        if not ascii_digits(limit_raw, 3) or not 1 <= int(limit_raw) <= 100:
            raise InvalidRequest("limit must be an integer from 1 to 100.", param="limit")
        return _json(await jobs.list_batches(who, q.get("after"), int(limit_raw)))

    @router.api_route("/v1/batches/{batch_id}", methods=GET_HEAD, summary="Retrieve a batch")
    async def get_batch(batch_id: str, request: Request) -> Response:
        return _json(await jobs.batch(await owner(request), batch_id))

    @router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch")
    async def cancel_batch(batch_id: str, request: Request) -> Response:
        return _json(await jobs.cancel_batch(await owner(request), batch_id))

    @router.api_route(
        "/v1/jobs/{job_id}", methods=GET_HEAD, summary="A single async job, and its response once done"
    )
    async def get_job(job_id: str, request: Request) -> Response:
        return _json(await jobs.job(await owner(request), job_id))

    @router.delete("/v1/jobs/{job_id}", summary="Cancel a single async job that has not started")
    async def cancel_job(job_id: str, request: Request) -> Response:
        return _json(await jobs.cancel_job(await owner(request), job_id))

    return router


async def submit_async(
    gw: Gateway, jobs: Jobs, proxy: ProxyEndpoint, scope: Scope, receive: Receive, send: Send
) -> None:
    """Answer a ``Prefer: respond-async`` request: validate, authorize, enqueue, 202.

    Accounted like any request that reached the pipeline (the audit line, the ledger row, the
    request metrics): status 202 with no tokens, or its refusal (401, 403, 429...), under the
    request's id (``X-Request-Id``, sent back). The job's run is a row of its own when it runs."""
    s = gw.settings
    endpoint = proxy.endpoint
    rid, _ = request_id_from(scope)
    ex = Exchange(rid, endpoint.name, time.perf_counter())
    job: dict[str, Any] | None = None
    try:
        ex.principal = principal = await gw.auth.authenticate(scope)
        length = header(scope, b"content-length")
        raw = await receive_stage.read_body(
            receive,
            int(length) if length and length.isdigit() else None,
            s.server.max_body_bytes,
            header_list(scope, b"content-encoding"),
        )
        req = receive_stage.parse(endpoint, raw, s.validation)
        ex.requested_model = ex.model = req.model
        ex.body_bytes = len(raw)
        if req.stream:
            raise InvalidRequest("`stream: true` cannot be run as an async job.", param="stream")
        body = dict(req.body)
        plan = gw.router.plan(scope, body, req.model)
        ex.route, ex.model = plan.name, plan.model
        gw.auth.authorize(principal, req.model, plan.model)
        check_model(gw.pool, plan.model)  # 404 at once for a model no backend lists, as when sync
        if gw.budgets is not None:
            await gw.budgets.check(principal)  # a spent month: 429 now, not a 429 job result later
        limiter = gw.limiter
        if limiter.enabled:
            # A request no wait lets through (more tokens than a whole budget per minute, under
            # the tier the job runs as): 429 tokens_exceed_limit now, as when sync, not a job.
            runs_as = principal if s.jobs.tier is None else replace(principal, tier=s.jobs.tier)
            never = limiter.never_fits(runs_as, limiter.estimate(len(raw), req.max_tokens, req.n))
            if never is not None:
                raise never
        key = header(scope, b"idempotency-key")
        ikey: str | None = None
        if key is not None:
            ikey = key.decode("latin-1")
            if not 0 < len(ikey) <= 255 or not ikey.isprintable():
                raise InvalidRequest(
                    "Idempotency-Key must be 1 to 255 printable characters.", param="Idempotency-Key"
                )
        task = header(scope, s.routing.task_header.encode())
        job, _created = await jobs.submit_job(
            principal,
            endpoint.path.decode(),
            raw,
            req.model,
            task.decode("latin-1") if task is not None else None,
            ikey,
        )
    except GatewayError as exc:
        ex.reason, ex.fault, ex.error = exc.reason, exc.fault, exc.message
        ex.limited = getattr(exc, "limit", None)
        await proxy.send_error(send, ex, exc)
    except receive_stage.ClientGone:
        ex.disconnected = True
    except (RedisError, OSError) as exc:
        from gateway.jobs.service import JobsUnavailable

        structlog.get_logger("gateway.jobs").warning(
            "job submission interrupted by the job store", cause=type(exc).__name__, exc_info=True
        )
        unavailable = JobsUnavailable()
        ex.reason, ex.fault, ex.error = unavailable.reason, unavailable.fault, type(exc).__name__
        await proxy.send_error(send, ex, unavailable)
    if job is not None:
        out = orjson.dumps(job)
        ex.status = 202
        await send(
            {
                "type": "http.response.start",
                "status": 202,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(out)).encode()),
                    (b"location", f"/v1/jobs/{job['id']}".encode()),
                    (b"preference-applied", b"respond-async"),
                    (b"x-request-id", rid.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": out})
    ex.finished = time.perf_counter()
    proxy.accountant.record(ex, gw.pool.known_model(ex.model))
