"""The hot routes without FastAPI's generic request handler: the same declarations, dependencies and endpoints.

FastAPI answers every request by walking the route's dependency graph (the router's auth and rate-limit
dependencies, their two security schemes, the services, the filters, each path and query parameter, the
body), which cost about a fifth of a millisecond per request on the hot routes. `HotRoute` keeps the route as
declared (its OpenAPI entry and its generic handler stay as they are) and puts a fast path in front of the
generic handler: the common request (a JSON body, plain query values) is parsed here, the same dependency
functions run in the same order, and the same endpoint function answers.

A request the fast path is not sure about goes to the generic handler untouched, before anything has been
counted or stored: a value FastAPI would coerce or refuse (`k=+5`, `exclude_window=yes`, a repeated `k`), a
body that is not plain JSON or does not validate, a filter over its limit, or an app with dependency
overrides (tests). So every error answer (422 naming the field, 413, ...) comes from the one handler that
always made it, and the fast path only has to agree with it on requests that succeed.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import fastapi.routing
from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security.base import SecurityBase

Fast = Callable[[Request, Any], Awaitable[Response | None]]
E = TypeVar("E", bound=Callable[..., Any])

_FAST = "__nextact_fast_path__"
JSON_TYPES = frozenset({"application/json", "application/json; charset=utf-8"})
_BOOLS = {"true": True, "false": False}
NO_BODY = object()  # the route has no body parameter


class FastPathError(RuntimeError):
    """A hot route has a dependency or parameter its fast path does not handle (the message names both)."""


def fast_path(
    fast: Fast, *, runs: tuple[Callable[..., Any], ...], reads: tuple[str, ...]
) -> Callable[[E], E]:
    """Give an endpoint a fast path. `runs`: every dependency (the router's included) that `fast` calls itself;
    `reads`: every path, query, header and cookie parameter it reads (the body is parsed for it)."""

    def mark(endpoint: E) -> E:
        setattr(endpoint, _FAST, (fast, frozenset(runs), frozenset(reads)))
        return endpoint

    return mark


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)


def _missed(dependant: Dependant, runs: frozenset[Any], reads: frozenset[str]) -> str | None:
    """The first dependency or parameter of the route that its fast path would not handle, named."""
    for d in _dependants(dependant):
        if d is not dependant and d.call is not None and d.call not in runs and not _is_security(d.call):
            return f"dependency {getattr(d.call, '__name__', d.call)}"
        for param in (*d.path_params, *d.query_params, *d.header_params, *d.cookie_params):
            if param.alias not in reads:
                return f"parameter {param.alias!r}"
    return None


class HotRoute(APIRoute):
    """An APIRoute whose endpoint may carry a fast path (`fast_path`); others get FastAPI's handler alone."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        generic = super().get_route_handler()
        marked = getattr(self.endpoint, _FAST, None)
        if marked is None:
            return generic
        fast, runs, reads = marked
        missed = _missed(self._effective_dependant(), runs, reads)
        if missed is not None:
            raise FastPathError(
                f"route {self.path}: {missed} is not handled by its fast path {fast.__name__}; "
                "handle it there and name it in fast_path(runs=..., reads=...)"
            )
        body_field = self.body_field

        async def handler(request: Request) -> Response:
            if not request.app.dependency_overrides:  # overrides: only the generic handler honours them
                body: Any = NO_BODY
                if body_field is not None:
                    body = await json_body(request, body_field)
                if body is not None:
                    response = await fast(request, body)
                    if response is not None:
                        return response
            return await generic(request)

        return handler

    def _effective_dependant(self) -> Dependant:
        """The dependant FastAPI builds this handler for: with an including router's dependencies, if any."""
        context_var = getattr(fastapi.routing, "_effective_route_context_var", None)  # FastAPI internals
        context = context_var.get() if context_var is not None else None
        if context is not None and getattr(context, "original_route", None) is self:
            return getattr(context, "dependant", self.dependant)  # type: ignore[no-any-return]
        return self.dependant


def _is_security(call: Callable[..., Any]) -> bool:
    """HTTPBearer / APIKeyHeader instances with auto_error=False: they only read a header, never refuse."""
    return isinstance(call, SecurityBase) and not getattr(call, "auto_error", True)


async def json_body(request: Request, field: Any) -> Any:
    """The validated body, or None when the generic handler should answer (not JSON, invalid, unreadable)."""
    if request.headers.get("content-type", "").lower() not in JSON_TYPES:
        return None
    try:
        raw = await request.body()  # cached on the request: the generic handler reads the same bytes
        data = json.loads(raw) if raw else None  # what FastAPI's handler does (Request.json)
    except Exception:  # noqa: BLE001 - anything: the generic handler answers it as it always has
        return None
    if data is None:
        return None
    value, errors = field.validate(data, {}, loc=("body",))  # FastAPI's own validation of this body
    return None if errors else value


class Query:
    """The query string's plain values; `ok` is False when any value needs FastAPI's coercion or refusal."""

    __slots__ = ("_params", "ok")

    def __init__(self, request: Request) -> None:
        self._params = request.query_params if request.scope["query_string"] else None
        self.ok = True

    def _one(self, name: str) -> str | None:
        if self._params is None:
            return None
        values = self._params.getlist(name)
        if len(values) > 1:  # repeated: FastAPI takes the last; leave that to it
            self.ok = False
        return values[-1] if values else None

    def integer(self, name: str, low: int, high: int) -> int | None:
        """A plain decimal in [low, high] (else not ok); None when absent."""
        value = self._one(name)
        if value is None:
            return None
        if value.isascii() and value.isdigit() and len(value) <= 9 and low <= int(value) <= high:
            return int(value)
        self.ok = False
        return None

    def flag(self, name: str, default: bool) -> bool:
        """`true` or `false` (other spellings are left to FastAPI); `default` when absent."""
        value = self._one(name)
        if value is None:
            return default
        if value in _BOOLS:
            return _BOOLS[value]
        self.ok = False
        return default

    def strings(self, name: str) -> list[str] | None:
        """Every value of a repeated parameter; None when absent."""
        if self._params is None:
            return None
        return self._params.getlist(name) or None
