"""API-key check and per-key rate limit, as one pure ASGI middleware in front of the routes.

- `Authorization: Bearer <key>` compared with hmac.compare_digest (constant time) against every
  configured key; guards /v1/*, /tokenize, /detokenize and the profiler endpoints. /health, /metrics
  and /version stay open (load balancers and Prometheus carry no key). 401 otherwise.
- Rate limit (optional, --rate-limit R req/s): a token bucket per key (per client address when no
  key is configured) holding up to max(1, R) requests, refilled at R per second; an empty bucket is a
  429 with Retry-After, the seconds until the next token.
"""
from __future__ import annotations

import hmac
import math
import time
from typing import Any

from jaxserve.server.errors import error_response

GUARDED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/start_profile", "/stop_profile")


def is_guarded(path: str) -> bool:
    return path.startswith(GUARDED_PREFIXES)


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)

    def take(self, key: str, now: float | None = None) -> float:
        """0.0 when admitted, else the seconds to wait for the next token."""
        now = time.monotonic() if now is None else now
        tokens, last = self.buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self.buckets[key] = (tokens - 1.0, now)
            return 0.0
        self.buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


def bearer_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" else None
    return None


class AuthMiddleware:
    def __init__(self, app: Any, api_keys: list[str], rate_limit: float | None = None) -> None:
        self.app = app
        self.api_keys = [k.encode() for k in api_keys if k]
        self.bucket = TokenBucket(rate_limit) if rate_limit else None

    def _key_ok(self, key: str | None) -> bool:
        if key is None:
            return False
        given = key.encode()
        ok = False
        for k in self.api_keys:  # check all keys, so timing does not say which one matched
            ok |= hmac.compare_digest(given, k)
        return ok

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not is_guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        key = bearer_key(scope.get("headers", []))
        if self.api_keys and not self._key_ok(key):
            msg = "missing API key (Authorization: Bearer <key>)" if key is None else "invalid API key"
            await error_response(401, msg, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        if self.bucket is not None:
            client = key if self.api_keys else (scope.get("client") or ("?",))[0]
            wait = self.bucket.take(client)
            if wait > 0:
                await error_response(429, f"rate limit of {self.bucket.rate:g} requests/s exceeded",
                                     headers={"Retry-After": str(math.ceil(wait))})(scope, receive, send)
                return
        await self.app(scope, receive, send)
