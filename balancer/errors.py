"""OpenAI-shaped error responses: `{"error": {"message", "type", "param", "code"}}`.

Clients use the official SDKs, which read exactly this shape; nothing else
(no traceback, no upstream detail that could carry a secret) goes in it.
"""

from __future__ import annotations

import json
import math

from aiohttp import web


class ClientError(Exception):
    """A request we refuse before it reaches a region; becomes a 4xx for the client."""

    def __init__(self, status: int, message: str, code: str, *,
                 type_: str = "invalid_request_error", param: str | None = None,
                 reason: str = "bad_request", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.param = param
        self.reason = reason  # label for balancer_client_rejections_total
        self.headers = headers or {}


def body(message: str, code: str, type_: str = "invalid_request_error",
         param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()


def response(status: int, message: str, code: str, *, type_: str = "invalid_request_error",
             param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body(message, code, type_, param),
                        content_type="application/json", headers=headers)


def from_client_error(exc: ClientError) -> web.Response:
    return response(exc.status, exc.message, exc.code, type_=exc.type, param=exc.param,
                    headers=exc.headers)


def retry_after_header(seconds: float) -> str:
    """`Retry-After` is whole seconds; round up so a client never comes back too early."""
    if not math.isfinite(seconds):
        seconds = 60.0
    return str(max(1, math.ceil(seconds)))


def no_capacity(model: str, seconds: float) -> web.Response:
    wait = retry_after_header(seconds)
    return response(
        429,
        f"No region can serve model {model!r} right now: every region is at its "
        f"token rate limit or cooling down. Please retry after {wait} seconds.",
        "rate_limit_exceeded",
        type_="rate_limit_error",
        headers={"Retry-After": wait, "retry-after-ms": str(int(min(seconds, 86400) * 1000))},
    )
