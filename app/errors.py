"""The edge: domain exceptions become JSON error answers ({"error", "message", "fields"?}); body size limit.

No answer carries a traceback; unexpected exceptions are logged with theirs and answered 500.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.batching import BatcherClosed, BatchError
from app.events import InvalidField, PayloadTooLarge, field_path
from app.windows import StoreError, StoreUnavailable

log = logging.getLogger(__name__)


class JSONBytes(Response):
    """JSON rendered by orjson (the service's fast path for every answer)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    fields: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONBytes:
    body: dict[str, Any] = {"error": code, "message": message}
    if fields is not None:
        body["fields"] = fields
    return JSONBytes(body, status_code=status, headers=headers)


def _validation(fields: list[dict[str, str]]) -> JSONBytes:
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return error_response(422, "validation_error", message, fields=fields)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _json_error(error: Any, doc: Any) -> str:
    """'invalid JSON at line L, column C (character P): why' (FastAPI's loc is ("body", P): not an array index)."""
    loc = error.get("loc", ())
    pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    why = str(error.get("ctx", {}).get("error", "JSON decode error"))
    if pos is None:
        return f"invalid JSON: {why}"
    if isinstance(doc, bytes | str):
        text = doc.decode("utf-8", "replace") if isinstance(doc, bytes) else doc
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return f"invalid JSON at line {line}, column {column} (character {pos}): {why}"
    return f"invalid JSON at character {pos}: {why}"


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 429: "rate_limited"}


def install_error_handlers(app: FastAPI, retry_after_seconds: int) -> None:
    """Register the domain-error -> HTTP answer mapping on the app."""
    retry = {"Retry-After": str(retry_after_seconds)}

    async def on_request_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _validation([{"field": "body", "message": _json_error(errors[0], exc.body)}])
        content_type = request.headers.get("content-type")
        if (
            content_type
            and not _is_json(content_type)
            and any(tuple(e.get("loc", ())) == ("body",) for e in errors)
        ):
            # FastAPI hands a non-JSON body over as bytes: say why, rather than that the shape is wrong
            message = (
                f"the body must be JSON sent with 'Content-Type: application/json' (got {content_type!r})"
            )
            return _validation([{"field": "body", "message": message}])
        fields = [
            {"field": field_path(e.get("loc", ())), "message": str(e.get("msg", "invalid"))} for e in errors
        ]
        return _validation(fields)

    async def on_invalid_field(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, InvalidField)
        return _validation([{"field": field_path(exc.loc), "message": exc.message}])

    async def on_too_large(_: Request, exc: Exception) -> Response:
        return error_response(413, "payload_too_large", str(exc))

    async def on_store(_: Request, exc: Exception) -> Response:
        log.warning("%s", getattr(exc, "log_message", exc))  # without the user id
        return error_response(
            503,
            "redis_unavailable",
            f"{exc}. Retry after {retry_after_seconds}s; resending events that carry an event_id is safe.",
            headers=retry,
        )

    async def on_store_error(_: Request, exc: Exception) -> Response:
        log.error("%s", getattr(exc, "log_message", exc))  # without the user id
        return error_response(500, "store_error", f"{exc}. Retrying will not help; see the server log.")

    async def on_batch(_: Request, exc: Exception) -> Response:
        if isinstance(exc, BatcherClosed):
            return error_response(503, "shutting_down", str(exc), headers=retry)
        return error_response(500, "inference_failed", str(exc))

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, ValueError) and "digits" in str(cause):
            # json.loads refuses integer literals over sys.get_int_max_str_digits() (a guard against slow parsing)
            limit = sys.get_int_max_str_digits()
            message = f"a number with more than {limit} digits is out of range"
            return _validation([{"field": "body", "message": message}])
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else orjson.dumps(exc.detail).decode()
        return error_response(exc.status_code, code, detail, headers=dict(exc.headers or {}))

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled %s", type(exc).__name__, exc_info=exc)
        return error_response(
            500, "internal_error", f"internal error ({type(exc).__name__}); see the server log"
        )

    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(InvalidField, on_invalid_field)
    app.add_exception_handler(PayloadTooLarge, on_too_large)
    app.add_exception_handler(StoreUnavailable, on_store)
    app.add_exception_handler(StoreError, on_store_error)
    app.add_exception_handler(BatchError, on_batch)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


class BodyLimitMiddleware:
    """413 for request bodies over max_bytes: by Content-Length up front, else while streaming (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                # more digits than any body we accept: over the limit (and no int() of a 5000-digit string)
                declared = (
                    (int(value) if len(value) <= 18 else self.max_bytes + 1) if value.isdigit() else None
                )
                break
        if declared is not None:
            if declared > self.max_bytes:
                await self._reject(scope, receive, send, declared)
                return
            await self.app(scope, receive, send)
            return
        # no Content-Length (chunked): read it all here, up to the limit, then replay it to the app
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(scope, receive, send, size)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        response = error_response(
            413,
            "payload_too_large",
            f"request body of {size} bytes or more is over the limit of {self.max_bytes} bytes (NEXTACT_MAX_BODY_BYTES)",
        )
        await response(scope, receive, send)
