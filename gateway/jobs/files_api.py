"""OpenAI's Files API: ``/v1/files`` routes over :class:`~gateway.jobs.files.Files`.

* ``POST /v1/files`` — multipart form: ``purpose`` (``batch`` or ``user_data``), optional
  ``expires_after[anchor]=created_at`` and ``expires_after[seconds]`` (3600 to 2592000), then
  ``file``, in any order; other fields are skipped, and a form has at most ``MAX_FORM_PARTS``
  parts (400 ``too_many_parts``). The file streams to the store as it arrives; the purpose's checks
  run while it streams when ``purpose`` came first, else once the form ends. Up to
  ``jobs.max_file_bytes`` (413 past it).
* ``GET /v1/files`` — ``purpose``, ``limit`` (1 to 10000, default 10000), ``after`` (a file
  id), ``order`` (``asc``/``desc``, default ``desc``): ``{"object": "list", "data",
  "first_id", "last_id", "has_more"}``.
* ``GET /v1/files/{file_id}``, ``GET /v1/files/{file_id}/content`` (the bytes, streamed),
  ``DELETE /v1/files/{file_id}`` (``{"id", "object": "file", "deleted": true}``).

Files belong to the principal's ``(subject, team)``; another principal's file is a 404, the
same answer as a file that does not exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from gateway.api.router import GET_HEAD, JSONBytes
from gateway.asgi import header, header_list
from gateway.errors import InvalidRequest, NotFound, PayloadTooLarge
from gateway.jobs.files import Files, Order, Received, owner_key
from gateway.jobs.upload_form import FormStream, form_boundary
from gateway.pipeline.authenticate import Authenticator
from gateway.pipeline.receive import UnsupportedMediaType

UPLOAD_PURPOSES = ("batch", "user_data")
MAX_LIST_LIMIT = 10000  # OpenAI's bound for GET /v1/files
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart heads and the small fields, beyond the file itself
# The form fields OpenAI's Files API defines beside `file`; any other is skipped, never kept.
FORM_FIELDS = frozenset({"purpose", "expires_after[anchor]", "expires_after[seconds]"})
MAX_FORM_PARTS = 16  # parts of one upload form: the API's four, and room for a client's extras


class _UploadCoding(UnsupportedMediaType):
    """415: an upload in a content coding (a file is stored as its bytes arrive, never decoded)."""

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"accept-encoding", b"identity")]


def _not_found(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id}", param="file_id")


def _purpose(value: str | None) -> str:
    if value is None:
        raise InvalidRequest(
            "`purpose` is required, and must come before `file` in the form.", param="purpose"
        )
    if value not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"`purpose` `{value[:40]}` is not accepted here; use one of: {', '.join(UPLOAD_PURPOSES)}.",
            param="purpose",
        )
    return value


def _expires_after(fields: dict[str, str]) -> int | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest("`expires_after[anchor]` must be `created_at`.", param="expires_after")
    if seconds is None or not ascii_digits(seconds, 12):
        raise InvalidRequest(
            "`expires_after[seconds]` must be a whole number of seconds.", param="expires_after"
        )
    return int(seconds)


def ascii_digits(raw: str, most: int) -> bool:
    """A query or form number: ASCII digits only, at most ``most`` of them (``str.isdigit``
    takes ``²``, which ``int`` refuses, and ``int`` refuses more than 4,300 digits: both were a
    500). Also for the batches' list (gateway/jobs/api.py)."""
    return 0 < len(raw) <= most and raw.isascii() and raw.isdigit()


def _limit(raw: str | None) -> int:
    if raw is None:
        return MAX_LIST_LIMIT
    if not ascii_digits(raw, 9) or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise InvalidRequest(f"`limit` must be an integer from 1 to {MAX_LIST_LIMIT}.", param="limit")
    return int(raw)


def _order(raw: str | None) -> Order:
    if raw in (None, "desc"):
        return "desc"
    if raw == "asc":
        return "asc"
    raise InvalidRequest("`order` must be `asc` or `desc`.", param="order")


def build_files_router(auth: Authenticator, files: Files) -> APIRouter:
    """The ``/v1/files`` routes; errors are ``GatewayError``s for the app's handlers
    (gateway/api/router.py ``install_error_handlers``)."""
    router = APIRouter()
    max_file_bytes = files.settings.max_file_bytes
    max_body = max_file_bytes + FORM_OVERHEAD_BYTES

    async def owner_of(request: Request) -> str:
        return owner_key(await auth.authenticate(request.scope))

    @router.post("/v1/files", summary="Upload a file (multipart: purpose, then file)")
    async def upload(request: Request) -> Response:
        owner = await owner_of(request)
        coding = header_list(request.scope, b"content-encoding") or b""
        if any(c.strip().lower() not in (b"", b"identity") for c in coding.split(b",")):
            raise _UploadCoding(
                "Uploads are stored as sent: send the multipart body without a Content-Encoding."
            )
        length = header(request.scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise PayloadTooLarge(
                f"The file exceeds the largest upload allowed here, {max_file_bytes} bytes.", param="file"
            )
        form = FormStream(request.stream(), form_boundary(request.headers.get("content-type")), max_body)
        fields: dict[str, str] = {}
        received: Received | None = None
        parts = 0
        try:
            while (part := await form.next_part()) is not None:
                parts += 1
                if parts > MAX_FORM_PARTS:
                    raise InvalidRequest(
                        f"The form has more than {MAX_FORM_PARTS} parts, the most allowed: send "
                        "`purpose` and `file` (and optionally `expires_after[anchor]` and "
                        "`expires_after[seconds]`).",
                        code="too_many_parts",
                    )
                if part.name != "file":
                    if part.name in FORM_FIELDS:
                        fields[part.name] = await form.text()
                    continue  # not a field of this API: skipped unread (next_part)
                if received is not None or part.filename is None:
                    raise InvalidRequest("Send exactly one `file` part, with a filename.", param="file")
                purpose = fields.get("purpose")
                received = await files.receive(
                    owner,
                    form.data(),
                    purpose=_purpose(purpose) if purpose is not None else None,
                    at_least=max(0, int(length) - FORM_OVERHEAD_BYTES) if length and length.isdigit() else 0,
                )
                filename = part.filename or "file"
            if received is None:
                raise InvalidRequest("The form has no `file` part.", param="file")
            await form.finish()  # the whole body, as announced, before anything is kept
            purpose = _purpose(fields.get("purpose"))
            expires_after = _expires_after(fields)
        except BaseException as exc:
            if received is not None:
                await asyncio.shield(files.discard(received))
            if isinstance(exc, ClientDisconnect):
                return Response(status_code=400)  # nobody reads it; nothing was kept
            raise
        record = await files.commit(received, filename, purpose, expires_after=expires_after)
        return JSONBytes(record)

    @router.api_route("/v1/files", methods=GET_HEAD, summary="The caller's files")
    async def list_files(request: Request) -> Response:
        owner = await owner_of(request)
        q = request.query_params
        data, has_more = await files.list(
            owner,
            purpose=q.get("purpose"),
            after=q.get("after"),
            limit=_limit(q.get("limit")),
            order=_order(q.get("order")),
        )
        return JSONBytes(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": has_more,
            }
        )

    @router.api_route("/v1/files/{file_id}", methods=GET_HEAD, summary="One file's record")
    async def retrieve(file_id: str, request: Request) -> Response:
        record = await files.get(await owner_of(request), file_id)
        if record is None:
            raise _not_found(file_id)
        return JSONBytes(record)

    @router.get("/v1/files/{file_id}/content", summary="One file's bytes")
    async def content(file_id: str, request: Request) -> Response:
        record = await files.get(await owner_of(request), file_id)
        if record is None:
            raise _not_found(file_id)
        chunks = files.content(file_id)
        try:
            first = await anext(chunks, b"")
        except FileNotFoundError:
            raise _not_found(file_id) from None

        async def body() -> AsyncIterator[bytes]:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk

        return StreamingResponse(
            body(), media_type="application/octet-stream", headers={"content-length": str(record["bytes"])}
        )

    @router.delete("/v1/files/{file_id}", summary="Delete a file")
    async def delete(file_id: str, request: Request) -> Response:
        if not await files.delete(await owner_of(request), file_id):
            raise _not_found(file_id)
        return JSONBytes({"id": file_id, "object": "file", "deleted": True})

    return router
