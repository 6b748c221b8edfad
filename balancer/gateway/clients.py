"""The client side of a request: its key, and its body read within bounds."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import os
from collections.abc import Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from balancer.errors import ClientError
from balancer.gateway.runtime import Runtime

JSON_TYPES = ("application/json", "")


def client_keys(env: Mapping[str, str] = os.environ
                ) -> tuple[tuple[bytes, ...], tuple[str | None, ...]]:
    """BALANCER_API_KEYS: comma-separated keys, each optionally `KEY#class` to give its
    requests a priority class of the admission queue."""
    keys, classes = [], []
    for entry in env.get("BALANCER_API_KEYS", "").split(","):
        key, _, cls = entry.strip().partition("#")
        if key:
            keys.append(key.encode())
            classes.append(cls or None)
    return tuple(keys), tuple(classes)


def authorize(request: web.Request, rt: Runtime) -> str | None:
    """With client keys configured, every API route needs one (Bearer or api-key),
    compared in constant time against every key so timing reveals nothing. Returns the
    priority class configured for the key (`KEY#class` in BALANCER_API_KEYS), if any."""
    if not rt.api_keys:
        return None
    given = request.headers.get("api-key", "")
    auth = request.headers.get("Authorization", "")
    if not given and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    # Fixed-length digests: compare_digest's time then depends on neither the keys'
    # contents nor their lengths. surrogateescape gives back the bytes as sent, so a
    # header that is not UTF-8 is merely a wrong key (strict encoding raised: a 500).
    candidate = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    ok = False
    key_class = None
    for key, cls in zip(digests(rt.api_keys), rt.key_classes or (None,) * len(rt.api_keys),
                        strict=True):
        same = hmac.compare_digest(candidate, key)
        ok |= same
        key_class = cls if same else key_class
    if not ok:
        raise ClientError(401, "Incorrect API key provided." if given else
                          "You didn't provide an API key. Use 'Authorization: Bearer KEY' or "
                          "an 'api-key' header.", "invalid_api_key", reason="auth")
    return key_class


@functools.lru_cache(maxsize=8)
def digests(keys: tuple[bytes, ...]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(k).digest() for k in keys)


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
