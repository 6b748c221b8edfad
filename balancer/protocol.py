"""The HTTP server under the app: even requests aiohttp cannot parse get an OpenAI error.

A bad request line, a CR or NUL smuggled into a header, an oversized header or broken
chunked framing fail inside aiohttp's parser, before any route or middleware runs.
aiohttp would answer them in text/plain and log a full traceback at ERROR for each,
so internet noise would look like gateway bugs and an attacker could flood the error
logs. Here they get the JSON error shape of every other answer and one INFO line that
names the exception class only (its text quotes the client's bytes).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from balancer import errors

log = logging.getLogger("balancer")


class _Protocol(RequestHandler):
    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            # A failure outside the middleware is a bug: aiohttp logs its traceback.
            super().handle_error(request, status, exc, message)
            response = errors.response(status, "The gateway failed to handle the request.",
                                       "internal_error", type_="server_error")
        else:
            kind = type(exc).__name__ if exc is not None else str(status)
            log.info("refused a malformed HTTP request from %s: %s", request.remote, kind)
            if request.writer.output_size > 0:
                raise ConnectionError("the response has started: cannot send an error")
            response = errors.response(status, f"The request is not valid HTTP ({kind}).",
                                       "invalid_http")
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer unparseable requests as above.
    (aiohttp has no public hook for it: tests/test_hardening.py fails if an aiohttp
    upgrade breaks the private one used here.)"""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server
