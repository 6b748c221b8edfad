"""The HTTP server under the app: even requests aiohttp cannot parse get an OpenAI error.

A bad request line, a CR or NUL smuggled into a header, an oversized header or broken
chunked framing fail inside aiohttp's parser, before any route or middleware runs.
aiohttp would answer them in text/plain (quoting the client's bytes back) and log a
full traceback at ERROR for each, so internet noise would look like gateway bugs and
an attacker could flood the error logs. Here they get the JSON error shape of every
other answer and one INFO line that names the exception class only (its text quotes
the client's bytes).

Why this is not done with public API (checked against aiohttp 3.14.5): the parser
queues an `_ErrInfo` and `RequestHandler.start()` serves it with
`RequestHandler._make_error_handler()`, which calls `self.handle_error(request, 400,
exc, message)` in place of the application's handler. So the app's middlewares never
see the request, and `on_response_prepare` is not sent either (`Request._prepare_hook`
returns early: the request was never routed, its `match_info` is None). A `logger=`
runner argument and a logging filter could quiet the log, but nothing public can
change the text/plain body. So the one hook is an override of
`web.RequestHandler.handle_error` (exported by `aiohttp.web` but undocumented, and
its call for parse errors is private), installed through public pieces only: the
runner's `setup()` and `server`, and `web.Server.__call__`, the protocol factory.
That is why pyproject.toml pins aiohttp to the tested minor version (TESTED_AIOHTTP),
and why tests/test_hardening.py fails if the installed aiohttp leaves that range or
the hook stops answering in JSON. Before widening the pin, re-read the path above in
the new aiohttp. If aiohttp's server or handler classes change, the hook stands aside.
Connections still get served, with aiohttp's own answer.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from aiohttp import web

from balancer import errors

log = logging.getLogger("balancer")

# The aiohttp minor version the hook below was checked against. It must match the pin
# in pyproject.toml. tests/test_hardening.py checks both.
TESTED_AIOHTTP = (3, 14)


def aiohttp_version() -> tuple[int, int]:
    major, minor = aiohttp.__version__.split(".")[:2]
    return int(major), int(minor)


class _Protocol(web.RequestHandler):
    __slots__ = ()  # same layout as RequestHandler, so an instance can switch to it

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
    def __call__(self) -> web.RequestHandler:
        handler = super().__call__()  # aiohttp builds it, with all the runner's arguments
        if type(handler) is web.RequestHandler:
            handler.__class__ = _Protocol  # allowed: a subclass with no slots of its own
        return handler


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer unparseable requests as above."""

    async def setup(self) -> None:
        await super().setup()
        if aiohttp_version() != TESTED_AIOHTTP:
            log.warning("aiohttp %s is not the version balancer/protocol.py was tested "
                        "with (%d.%d): malformed HTTP may get aiohttp's own answer",
                        aiohttp.__version__, *TESTED_AIOHTTP)
        server = self.server
        if type(server) is web.Server:
            server.__class__ = _Server
