"""Around every request: OpenAI-shaped errors, the request id, one access-log line."""

from __future__ import annotations

import logging
import re
import time

from aiohttp import web

from balancer import errors
from balancer.errors import ClientError
from balancer.gateway.runtime import RECORD, RUNTIME, Record, new_id

log = logging.getLogger("balancer")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@web.middleware
async def openai_errors(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """Every failure becomes an OpenAI-shaped JSON error; one access-log line per
    API request; `x-request-id` is honoured or generated and always returned."""
    incoming = request.headers.get("x-request-id", "")
    request_id = incoming if REQUEST_ID.match(incoming) else new_id()
    record = Record(request_id)
    request[RECORD] = record
    rt = request.app[RUNTIME]
    started = time.perf_counter()
    rt.in_flight += 1
    rt.metrics.in_flight.inc()
    try:
        response = await handler(request)
    except ClientError as exc:
        rt.metrics.rejections.labels(exc.reason).inc()
        response = errors.from_client_error(exc)
        if exc.status == 408:  # close at once rather than linger reading a trickled body
            response.force_close()
    except web.HTTPException as exc:
        response = _http_exception(exc)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        response = errors.response(500, "The gateway failed to handle the request.",
                                   "internal_error", type_="server_error")
    finally:
        rt.in_flight -= 1
        rt.metrics.in_flight.dec()
    if record.model is not None:
        if not response.prepared:  # streams count themselves once relayed
            rt.child(rt.metrics.requests, record.model, record.region or "none",
                     str(response.status), record.operation).inc()
            if record.client is not None:
                rt.child(rt.metrics.client_requests, record.client, record.model,
                         str(response.status)).inc()
        rt.access.write({
            "request_id": request_id, "method": request.method, "path": request.path,
            "model": record.model, "operation": record.operation, "region": record.region,
            "attempts": record.attempts,
            "status": response.status,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens})
    return response


def _http_exception(exc: web.HTTPException) -> web.Response:
    codes = {404: ("not_found", "Unknown route."), 405: ("method_not_allowed",
             "Method not allowed."), 413: ("request_too_large", "The request body is too large.")}
    code, message = codes.get(exc.status, ("http_error", exc.reason))
    if exc.status == 404 and exc.text and "Not Found" not in exc.text:
        message = exc.text
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return errors.response(exc.status, message, code, headers=headers)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    record = request.get(RECORD)
    if record is not None:
        response.headers["x-request-id"] = record.request_id
        if record.headers:  # the client's own x-ratelimit-* (gateway.budgets)
            response.headers.update(record.headers)
