"""The physical-limit baseline: a bare aiohttp pass-through to one fixed upstream URL.

    python -m bench.passthrough --port 8300 --upstream URL [--header api-key=KEY]

It does what any Python proxy must do and nothing else: read the client's body, send
the same bytes upstream over a pooled keep-alive session, relay status, content type
and body (streams chunk by chunk). No parsing, no routing, no capacity store, no
metrics, no logs. The gateway's overhead is measured against this, on the same event
loop (asyncio's) and the same aiohttp, so the difference is the gateway's own work.
"""

from __future__ import annotations

import argparse
import sys

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
HEADERS = web.AppKey("headers", dict)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].post(request.app[UPSTREAM], data=body,
                                         headers=request.app[HEADERS]) as up:
        ctype = up.headers.get("Content-Type", "application/json")
        if up.content_type != "text/event-stream":
            return web.Response(status=up.status, body=await up.read(),
                                headers={"Content-Type": ctype})
        response = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
        await response.prepare(request)
        async for chunk in up.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app(upstream: str, headers: dict[str, str]) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream
    app[HEADERS] = {"Content-Type": "application/json", **headers}

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        # The same pooling as the gateway's upstream session: unlimited, keep-alive.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
        app[SESSION] = aiohttp.ClientSession(
            connector=connector, skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=120))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{tail:.*}", forward)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.passthrough", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="the URL every request is sent to")
    p.add_argument("--header", action="append", default=[], help="NAME=VALUE sent upstream")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="the event loop (asyncio: the issue's baseline; uvloop: the gateway's "
                        "default loop, for a like-for-like row)")
    args = p.parse_args(argv)
    headers = dict(h.split("=", 1) for h in args.header)
    loop = None
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(create_app(args.upstream, headers), host=args.host, port=args.port,
                access_log=None, print=None, loop=loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
