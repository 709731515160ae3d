"""The two clients. Each call is a `_Call` (method, path, body, how to read the answer), sent by the sync or
the async transport with the same retry policy, so both clients behave identically."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar

import httpx

from nextact_client.models import (
    BulkEvent,
    BulkResult,
    Event,
    ModelInfo,
    NextactError,
    ReloadResult,
    StoredEvent,
    UserPrediction,
    with_ids,
)

T = TypeVar("T")
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_ERRORS = (httpx.TransportError,)  # connect/read/write errors and timeouts


@dataclass(frozen=True)
class _Call(Generic[T]):
    method: str
    path: str
    read: Callable[[httpx.Response], T]
    json: Any = None
    params: dict[str, Any] | None = None


class _Base:
    def __init__(self, base_url: str, api_key: str | None, retries: int, backoff: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = retries
        self.backoff = backoff

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Retry-After when the server sent one, else exponential backoff with jitter."""
        if response is not None:
            try:
                return max(0.0, float(response.headers.get("Retry-After", "")))
            except ValueError:
                pass
        return self.backoff * (2**attempt) * (0.5 + random.random() / 2)

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            body = response.json()
        except ValueError:
            body = {}
        raise NextactError(
            response.status_code,
            str(body.get("error", "http_error")),
            str(body.get("message", response.text)),
            body.get("fields"),
        )

    # --- the API: each method returns the _Call; the clients below send it ---------------------------------

    @staticmethod
    def _k(k: int | None) -> dict[str, Any]:
        return {} if k is None else {"k": k}

    def _post_events(self, user_id: str, events: Sequence[Event], k: int | None) -> _Call[UserPrediction]:
        bodies = with_ids(list(events))
        body = bodies[0] if len(bodies) == 1 else {"events": bodies}
        return _Call("POST", f"/v1/users/{_quote(user_id)}/events", _prediction, body, self._k(k))

    def _post_bulk(self, events: Sequence[BulkEvent], predict: bool, k: int | None) -> _Call[BulkResult]:
        params = {"predict": "true" if predict else "false", **self._k(k)}
        return _Call(
            "POST",
            "/v1/events",
            lambda r: BulkResult.from_json(r.json()),
            {"events": with_ids(list(events))},
            params,
        )

    def _predict(self, user_id: str, k: int | None) -> _Call[UserPrediction]:
        return _Call("GET", f"/v1/users/{_quote(user_id)}/predictions", _prediction, params=self._k(k))

    def _window(self, user_id: str) -> _Call[list[StoredEvent]]:
        return _Call(
            "GET",
            f"/v1/users/{_quote(user_id)}/events",
            lambda r: [StoredEvent(e["action"], e["timestamp"], e["event_id"]) for e in r.json()["events"]],
        )

    def _delete(self, user_id: str) -> _Call[None]:
        return _Call("DELETE", f"/v1/users/{_quote(user_id)}", lambda r: None)

    def _model(self) -> _Call[ModelInfo]:
        return _Call("GET", "/v1/model", lambda r: ModelInfo.from_json(r.json()))

    def _reload(self) -> _Call[ReloadResult]:
        def read(r: httpx.Response) -> ReloadResult:
            data = r.json()
            return ReloadResult(data["model_version"], data.get("previous_version"), data["seconds"])

        return _Call("POST", "/v1/model/reload", read)


def _prediction(response: httpx.Response) -> UserPrediction:
    return UserPrediction.from_json(response.json())


def _quote(user_id: str) -> str:
    from urllib.parse import quote

    return quote(user_id, safe="")


class NextactClient(_Base):
    """Synchronous client. `with NextactClient(url) as c: c.post_event("alice", "pv")`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, retries, backoff)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call[T]) -> T:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(call.method, call.path, json=call.json, params=call.params)
            except RETRY_ERRORS:
                if last:
                    raise
                time.sleep(self._delay(attempt, None))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                time.sleep(self._delay(attempt, response))
                continue
            self._raise_for(response)
            return call.read(response)
        raise AssertionError("unreachable")

    def post_event(
        self,
        user_id: str,
        action: str,
        *,
        timestamp: float | None = None,
        event_id: str | None = None,
        k: int | None = None,
    ) -> UserPrediction:
        """Append one event to the user's window; the prediction from the updated window."""
        return self._send(self._post_events(user_id, [Event(action, timestamp, event_id)], k))

    def post_events(self, user_id: str, events: Sequence[Event], k: int | None = None) -> UserPrediction:
        """Append several events of one user (any order); the prediction from the updated window."""
        return self._send(self._post_events(user_id, events, k))

    def post_bulk(
        self, events: Sequence[BulkEvent], *, predict: bool = False, k: int | None = None
    ) -> BulkResult:
        """Events of many users in one request; with `predict`, one prediction per user."""
        return self._send(self._post_bulk(events, predict, k))

    def predict(self, user_id: str, k: int | None = None) -> UserPrediction:
        """The prediction from the user's current window, adding nothing."""
        return self._send(self._predict(user_id, k))

    def window(self, user_id: str) -> list[StoredEvent]:
        """The user's stored events, oldest first."""
        return self._send(self._window(user_id))

    def delete_user(self, user_id: str) -> None:
        """Erase everything stored for the user."""
        self._send(self._delete(user_id))

    def model(self) -> ModelInfo:
        return self._send(self._model())

    def reload_model(self) -> ReloadResult:
        return self._send(self._reload())


class AsyncNextactClient(_Base):
    """Asynchronous client. `async with AsyncNextactClient(url) as c: await c.post_event("alice", "pv")`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, retries, backoff)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.json, params=call.params
                )
            except RETRY_ERRORS:
                if last:
                    raise
                await asyncio.sleep(self._delay(attempt, None))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                await asyncio.sleep(self._delay(attempt, response))
                continue
            self._raise_for(response)
            return call.read(response)
        raise AssertionError("unreachable")

    async def post_event(
        self,
        user_id: str,
        action: str,
        *,
        timestamp: float | None = None,
        event_id: str | None = None,
        k: int | None = None,
    ) -> UserPrediction:
        return await self._send(self._post_events(user_id, [Event(action, timestamp, event_id)], k))

    async def post_events(
        self, user_id: str, events: Sequence[Event], k: int | None = None
    ) -> UserPrediction:
        return await self._send(self._post_events(user_id, events, k))

    async def post_bulk(
        self, events: Sequence[BulkEvent], *, predict: bool = False, k: int | None = None
    ) -> BulkResult:
        return await self._send(self._post_bulk(events, predict, k))

    async def predict(self, user_id: str, k: int | None = None) -> UserPrediction:
        return await self._send(self._predict(user_id, k))

    async def window(self, user_id: str) -> list[StoredEvent]:
        return await self._send(self._window(user_id))

    async def delete_user(self, user_id: str) -> None:
        await self._send(self._delete(user_id))

    async def model(self) -> ModelInfo:
        return await self._send(self._model())

    async def reload_model(self) -> ReloadResult:
        return await self._send(self._reload())
