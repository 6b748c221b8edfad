"""The alternatives the balancing benchmark compares the gateway with: a stateless proxy
that knows the regions of a regions.yaml and nothing about their remaining capacity.

    python -m bench.naive_proxy --mode uniform --config regions.yaml --port 8400

- `uniform`: the naive proxy. Regions in a uniformly shuffled order per request.
- `static`:  static TPM weights. Regions ordered per request by a weighted random draw
  (without replacement) with weights = configured TPM, so a region with twice the TPM
  is tried first twice as often.

Both fail over on 429, 5xx or a network error to the next region of the order, at most
`--max-attempts` regions (the gateway's `max_attempts`, 3 by default), and relay the
last failure when all attempts fail. Replicas share nothing. To keep the comparison
fair they use the gateway's own URL and auth helpers, a pooled keep-alive session and
the gateway's timeouts, and they forward the client's bytes unchanged.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence

import aiohttp
from aiohttp import web

from balancer import config as config_mod
from balancer import upstream
from balancer.config import Config, Target
from balancer.operations import OPERATIONS as OPS

MODE = web.AppKey("mode", str)
CONFIG = web.AppKey("config", Config)
TARGETS = web.AppKey("targets", dict)
SESSION = web.AppKey("session", aiohttp.ClientSession)
RETRY = (429, 500, 502, 503, 504)


def order(targets: Sequence[Target], mode: str, rng: random.Random) -> list[Target]:
    """The regions to try, in order."""
    if mode == "uniform":
        return rng.sample(list(targets), len(targets))
    # Weighted sampling without replacement (Efraimidis-Spirakis): key u^(1/w), largest first.
    keyed = [(rng.random() ** (1.0 / t.deployment.tpm), i) for i, t in enumerate(targets)]
    return [targets[i] for _, i in sorted(keyed, reverse=True)]


def _error(status: int, message: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "proxy_error", "param": None, "code": code}}
    return web.json_response(body, status=status)


async def handle(request: web.Request) -> web.StreamResponse:
    op = request.match_info["op"]
    raw = await request.read()
    try:
        body = json.loads(raw)
        model = body["model"]
    except (ValueError, KeyError, TypeError):
        return _error(400, "The body must be a JSON object with a model.", "invalid_request")
    cfg = request.app[CONFIG]
    targets = request.app[TARGETS].get(model)
    if not targets:
        return _error(404, f"The model '{model}' does not exist.", "model_not_found")
    gw = cfg.gateway
    timeout = aiohttp.ClientTimeout(total=None, connect=gw.connect_timeout_seconds,
                                    sock_read=gw.read_timeout_seconds)
    session = request.app[SESSION]
    last: web.Response | None = None
    for target in order(targets, request.app[MODE], random)[:gw.max_attempts]:
        region = target.region.name
        try:
            up = await session.post(upstream.url(target, OPS[op]), data=raw,
                                    headers=upstream.headers(target), timeout=timeout)
        except upstream.TRANSPORT_ERRORS:
            last = _error(502, "The upstream region failed.", "connect")
            continue
        async with up:
            if up.status in RETRY:  # fail over to the next region
                headers = {"x-balancer-region": region}
                if "retry-after" in up.headers:
                    headers["Retry-After"] = up.headers["retry-after"]
                last = web.Response(status=up.status, body=await up.read(), headers=headers,
                                    content_type="application/json")
                continue
            if up.content_type != "text/event-stream":
                return web.Response(status=up.status, body=await up.read(), headers={
                    "Content-Type": up.headers.get("Content-Type", "application/json"),
                    "x-balancer-region": region})
            response = web.StreamResponse(status=up.status, headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "x-balancer-region": region})
            await response.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
            except upstream.TRANSPORT_ERRORS:
                pass  # the client sees a stream without [DONE]
            await response.write_eof()
            return response
    assert last is not None
    return last


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "mode": request.app[MODE]})


def create_app(cfg: Config, mode: str) -> web.Application:
    app = web.Application(client_max_size=cfg.gateway.max_body_bytes)
    app[MODE], app[CONFIG], app[TARGETS] = mode, cfg, cfg.models

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = upstream.new_session(cfg.gateway.connect_timeout_seconds)
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/{op:" + "|".join(OPS) + "}", handle)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.naive_proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["uniform", "static"], required=True)
    p.add_argument("--config", required=True, help="regions.yaml (the gateway's own format)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-attempts", type=int, help="override gateway.max_attempts")
    args = p.parse_args(argv)
    cfg = config_mod.load(args.config)
    if args.max_attempts:
        from dataclasses import replace

        cfg = replace(cfg, gateway=replace(cfg.gateway, max_attempts=args.max_attempts))
    web.run_app(create_app(cfg, args.mode), host=args.host, port=args.port, access_log=None,
                print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
