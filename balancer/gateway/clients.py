"""The client side of a request: who it is from (its key), and its body read within
bounds."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from balancer.errors import ClientError
from balancer.gateway.runtime import ANONYMOUS, Runtime, Tenant, digests

__all__ = ["ANONYMOUS", "Tenant", "authorize", "authorize_admin", "digests", "presented",
           "read_body"]

JSON_TYPES = ("application/json", "")


def authorize(request: web.Request, rt: Runtime) -> Tenant:
    """The tenant whose key the request carries (Bearer or api-key). With no client key
    configured (neither `clients:` in regions.yaml nor BALANCER_API_KEYS) every request
    is ANONYMOUS; with any, a missing or unknown key is a 401. The key is compared in
    constant time against every key, so timing reveals nothing. Admin keys are not
    client keys."""
    table = rt.keys  # one read: a reload may swap it
    if not table.digests:
        return ANONYMOUS
    given, candidate = presented(request)
    ok, tenant = False, ANONYMOUS
    for digest, each in zip(table.digests, table.tenants, strict=True):
        same = hmac.compare_digest(candidate, digest)
        tenant = each if same and not ok else tenant  # the first match: a client's
        ok |= same
    if not ok:
        raise ClientError(401, "Incorrect API key provided." if given else
                          "You didn't provide an API key. Use 'Authorization: Bearer KEY' or "
                          "an 'api-key' header.", "invalid_api_key", reason="auth")
    return tenant


def authorize_admin(request: web.Request, rt: Runtime) -> None:
    """The admin routes (/regions, /metrics, /clients). With BALANCER_ADMIN_KEYS set they
    need one of those keys, compared as `authorize` does; a client key never grants
    admin. Without, what `authorize` asks (a client key, when any is configured)."""
    table = rt.keys
    if not table.admin:
        authorize(request, rt)
        return
    given, candidate = presented(request)
    ok = False
    for digest in table.admin:
        ok |= hmac.compare_digest(candidate, digest)
    if not ok:
        raise ClientError(401, "This route needs an admin key (one of BALANCER_ADMIN_KEYS) "
                          "in 'Authorization: Bearer KEY' or an 'api-key' header; client "
                          "keys are not admin keys." if given else
                          "This route needs an admin key: use 'Authorization: Bearer KEY' or "
                          "an 'api-key' header.", "invalid_api_key", reason="auth")


def presented(request: web.Request) -> tuple[str, bytes]:
    """The key a request carries (`api-key`, else `Authorization: Bearer`), and its
    SHA-256. Fixed-length digests: compare_digest's time then depends on neither the
    keys' contents nor their lengths. surrogateescape gives back the bytes as sent, so a
    header that is not UTF-8 is merely a wrong key (strict encoding raised: a 500)."""
    given = request.headers.get("api-key", "")
    auth = request.headers.get("Authorization", "")
    if not given and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return given, hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()


async def read_body(request: web.Request, limit: int, seconds: float) -> bytes:
    """The body, refused with 413 past `limit` bytes (read in chunks, so a reload can
    change the limit and an oversized body is never held whole), and with 408 when it
    takes longer than `seconds`: a client trickling its body (slowloris) must
    not hold a handler and a connection forever."""
    # No Content-Type at all is taken as JSON; aiohttp reports both that and an
    # unparseable one ("json") as application/octet-stream, so look at the header.
    ctype = request.content_type if "Content-Type" in request.headers else ""
    if ctype not in JSON_TYPES and not ctype.endswith("+json"):
        raise ClientError(415, f"Unsupported Content-Type {ctype!r}: send application/json.",
                          "unsupported_media_type")
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    if request.content_length is not None and request.content.is_eof():
        return await request.read()  # all there already (most bodies): nothing to wait for
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.content.iter_chunked(65536):
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                parts.append(chunk)
    except TimeoutError:
        raise ClientError(408, f"The request body did not arrive within {seconds:g} s.",
                          "request_timeout", reason="timeout") from None
    except (ConnectionError, HttpProcessingError):
        # The client left mid-body, or its chunked framing is broken: its fault, not ours.
        raise ClientError(400, "The request body was cut short or badly framed.",
                          "invalid_body") from None
    return b"".join(parts)


def _too_large(limit: int) -> ClientError:
    return ClientError(413, f"The request body is larger than {limit} bytes.",
                       "request_too_large", reason="too_large")
