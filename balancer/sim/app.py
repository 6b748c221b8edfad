"""The simulator's aiohttp app: its routes, and `start` to serve it on a port."""

from __future__ import annotations

import time

from aiohttp import web

from balancer.operations import OPERATIONS
from balancer.sim import id_routes
from balancer.sim.config import SimConfig
from balancer.sim.control import get_knobs, get_stats, post_knobs, post_reset
from balancer.sim.errors import api_errors
from balancer.sim.routes import AZURE, AZURE_V1, OPENAI, create_handler
from balancer.sim.state import SIMULATOR, Clock, Simulator

_ALL = "|".join(OPERATIONS)
# Azure has /openai/deployments/{deployment}/... only for the older operations; the others
# name their deployment in the body's `model` (/openai/responses?api-version=...)
_IN_PATH = "|".join(name for name, op in OPERATIONS.items() if op.deployment_route)
_BODY_MODEL = "|".join(name for name, op in OPERATIONS.items() if not op.deployment_route)


async def _tag_region(request: web.Request, response: web.StreamResponse) -> None:
    region = request.match_info.get("region")
    if region in request.app[SIMULATOR].regions:
        response.headers["x-sim-region"] = region


async def _on_shutdown(app: web.Application) -> None:
    app[SIMULATOR].closing.set()


def create_app(config: SimConfig, *, clock: Clock = time.monotonic) -> web.Application:
    """The simulator app; `clock` (monotonic seconds) drives the buckets and can be faked."""
    app = web.Application(middlewares=[api_errors])
    app[SIMULATOR] = Simulator(config, clock)
    app.on_response_prepare.append(_tag_region)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/_sim/stats", get_stats)
    app.router.add_post("/_sim/reset", post_reset)
    app.router.add_get("/_sim/regions/{region}", get_knobs)
    app.router.add_post("/_sim/regions/{region}", post_knobs)
    add_post = app.router.add_post
    add_post(
        "/{region}/openai/deployments/{deployment}/{op:" + _IN_PATH + "}",
        create_handler(AZURE, deployment_in_path=True),
    )
    add_post("/{region}/openai/v1/{op:" + _ALL + "}", create_handler(AZURE_V1))
    if _BODY_MODEL:
        add_post("/{region}/openai/{op:" + _BODY_MODEL + "}", create_handler(AZURE))
    add_post("/{region}/v1/{op:" + _ALL + "}", create_handler(OPENAI))
    for prefix, style in (
        ("/{region}/openai/v1/responses", AZURE_V1),
        ("/{region}/openai/responses", AZURE),
        ("/{region}/v1/responses", OPENAI),
    ):
        id_routes.add_routes(app.router, prefix, style)
    return app


async def start(
    config: SimConfig, host: str = "127.0.0.1", port: int = 0, *, clock: Clock = time.monotonic
) -> tuple[web.AppRunner, str]:
    """Serve a simulator; returns its runner (call `cleanup()`) and base URL."""
    runner = web.AppRunner(create_app(config, clock=clock), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_port = runner.addresses[0][1]
    url_host = "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound_port}"
