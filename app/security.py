"""API-key authentication for the /v1 routes.

NEXTACT_API_KEYS is either a comma-separated list of keys or the path of a file with one key per line
(blank lines and lines starting with # are skipped). When it is empty, authentication is off and
start-up logs one warning. A request authenticates with `Authorization: Bearer <key>` or `X-API-Key: <key>`.

Keys are never logged or put into metrics: a request is identified by the key's fingerprint
(first 12 hex digits of its SHA-256), which is also what the rate limiter counts against.
Failed attempts are limited per client address (FailedAuthLimiter, NEXTACT_AUTH_FAILURE_LIMIT).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 512  # longer header values are rejected before any comparison


class ApiKeyConfigError(ValueError):
    """NEXTACT_API_KEYS names a file that cannot be read, or holds an unusable key."""


def fingerprint(key: str) -> str:
    """A stable, non-reversible identifier for a key, safe for logs and rate-limit buckets."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def parse_api_keys(value: str | None) -> tuple[str, ...]:
    """Keys from a comma-separated list, or from a file when `value` is the path of an existing file."""
    if value is None or not value.strip():
        return ()
    raw = value.strip()
    candidate = Path(raw).expanduser()
    if "," not in raw and (candidate.is_file() or raw.startswith(("/", "./", "~"))):
        try:
            text = candidate.read_text(encoding="utf-8")
        except OSError as e:
            raise ApiKeyConfigError(
                f"NEXTACT_API_KEYS: cannot read key file {candidate}: {e.strerror}"
            ) from e
        items = [
            line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
        source = str(candidate)
    else:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        source = "NEXTACT_API_KEYS"
    for i, key in enumerate(items, 1):
        # the message names the position, never the key itself
        if len(key) > MAX_KEY_LENGTH or not (key.isascii() and key.isprintable()) or " " in key:
            raise ApiKeyConfigError(
                f"{source}: key #{i} must be printable ASCII without spaces, at most {MAX_KEY_LENGTH} characters"
            )
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class ApiKeyAuth:
    """The accepted keys; empty means authentication is off."""

    keys: tuple[str, ...] = ()

    @classmethod
    def from_setting(cls, value: str | None) -> ApiKeyAuth:
        auth = cls(parse_api_keys(value))
        if auth.enabled:
            log.info("authentication on: %d API key(s) accepted on /v1 routes", len(auth.keys))
        else:
            log.warning("authentication OFF: NEXTACT_API_KEYS is not set, /v1 routes are open to anyone")
        return auth

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def verify(self, presented: str) -> str | None:
        """The fingerprint of the matching key, or None. Compares against every key in constant time."""
        if not presented or len(presented) > MAX_KEY_LENGTH:
            return None
        given = presented.encode("utf-8", "surrogateescape")
        match: str | None = None
        for key in self.keys:  # no early exit: the time taken does not say which key (or how much) matched
            if hmac.compare_digest(given, key.encode("utf-8")):
                match = key
        return fingerprint(match) if match is not None else None


def presented_key(request: Request) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>` first, else `X-API-Key`."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def client_address(request: Request) -> str:
    """The client's address: the TCP peer, or X-Forwarded-For's when the peer is a trusted proxy
    (uvicorn applies NEXTACT_FORWARDED_ALLOW_IPS before the request gets here)."""
    return request.client.host if request.client else "unknown"


class FailedAuthLimiter:
    """At most `limit` failed authentications per client address per fixed window, counted in this process.

    Over the limit, every request from that address gets 429 until its window ends, a correct key included
    (else guessing could go on at full speed). Memory is bounded: the oldest addresses are forgotten first.
    """

    def __init__(
        self,
        limit: int,
        window_seconds: float,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window_seconds
        self.max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, tuple[float, int]] = (
            OrderedDict()
        )  # address -> (window start, count)

    def _entry(self, client: str) -> tuple[float, int]:
        now = self._clock()
        start, count = self._failures.get(client, (now, 0))
        return (now, 0) if now - start >= self.window else (start, count)

    def retry_after(self, client: str) -> int | None:
        """Seconds until `client` may try again, or None when it is not blocked."""
        if client not in self._failures:
            return None
        start, count = self._entry(client)
        if count < self.limit:
            return None
        return max(1, math.ceil(start + self.window - self._clock()))

    def failed(self, client: str) -> None:
        start, count = self._entry(client)
        self._failures[client] = (start, count + 1)
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)


def is_authenticated(request: Request) -> bool:
    """Does the request carry an accepted key (always true with authentication off)? Counts nothing."""
    auth: ApiKeyAuth | None = getattr(request.app.state, "auth", None)
    if auth is None or not auth.enabled:
        return True
    if getattr(request.state, "principal", None):
        return True
    key = presented_key(request)
    return key is not None and auth.verify(key) is not None


def client_identity(request: Request) -> str:
    """Who a request counts as for rate limiting: its key fingerprint, else its client address."""
    principal = getattr(request.state, "principal", None)
    if principal:
        return str(principal)
    return f"ip:{client_address(request)}"


# Declared in the OpenAPI document (so /docs has an "Authorize" button); they never reject a request
# themselves (auto_error=False): require_api_key decides, and only when NEXTACT_API_KEYS is set.
_KEY_HELP = "One of the keys in NEXTACT_API_KEYS; only checked when that setting is not empty."
bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="bearerKey", description=f"`Authorization: Bearer <key>`. {_KEY_HELP}"
)
header_scheme = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="apiKeyHeader",
    description=f"`X-API-Key: <key>`. {_KEY_HELP}",
)


async def require_api_key(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)] = None,
    _header: Annotated[str | None, Security(header_scheme)] = None,
) -> str | None:
    """FastAPI dependency for /v1 routes: 401 unless the request carries an accepted key (when auth is on).

    Returns the principal ("key:<fingerprint>") and stores it on request.state for the rate limiter and logs.
    The two scheme parameters only document the accepted headers; the key is read by `presented_key`.
    """
    auth: ApiKeyAuth | None = getattr(request.app.state, "auth", None)
    if auth is None or not auth.enabled:
        return None
    metrics = getattr(request.app.state, "metrics", None)
    limiter: FailedAuthLimiter | None = getattr(request.app.state, "auth_limiter", None)
    client = client_address(request)
    wait = limiter.retry_after(client) if limiter is not None else None
    if wait is not None:
        assert limiter is not None
        if metrics is not None:
            metrics.auth_failures.labels(reason="blocked").inc()
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"too many failed authentication attempts from this address ({limiter.limit} per "
            f"{limiter.window:g} s); retry after {wait} s",
            headers={"Retry-After": str(wait)},
        )
    key = presented_key(request)
    found = auth.verify(key) if key is not None else None
    if found is None:
        if limiter is not None:
            limiter.failed(client)
        if metrics is not None:
            metrics.auth_failures.labels(reason="missing" if key is None else "invalid").inc()
        detail = "missing API key" if key is None else "invalid API key"
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"{detail}: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = f"key:{found}"
    request.state.principal = principal
    return principal
