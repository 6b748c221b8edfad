"""`balancer simulate` and `python -m balancer.sim`: serve simulated regions on a port."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import replace

from balancer import config as config_mod
from balancer.sim.app import start
from balancer.sim.config import THROTTLE_HEADERS, SimConfig, reference_regions
from balancer.sim.twin import simulator_config

DESCRIPTION = (
    "Azure-like simulated regions: real HTTP upstreams with TPM/RPM limits, 429s and SSE."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `balancer simulate` (also used by `python -m balancer.sim`)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="10: a simulated minute lasts 6 s (default 1, or the config's gateway.time_scale)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="simulate the regions of this regions.yaml (same TPM/RPM) instead of the reference",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--regions", choices=["reference"], default="reference")
    parser.add_argument("--deployment", default="gpt-4", help="deployment name in every region")
    parser.add_argument("--api-key", default=None, help="key every region requires (default: any)")
    parser.add_argument("--latency-base-ms", type=float, default=20.0)
    parser.add_argument("--latency-per-token-ms", type=float, default=0.5)
    parser.add_argument("--token-window-seconds", type=float, default=10.0)
    parser.add_argument("--default-max-tokens", type=int, default=1024)
    parser.add_argument("--throttle-headers", choices=THROTTLE_HEADERS, default="normal",
                        help="every region's rate-limit header style (sim/config.py)")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    if args.config:
        cfg = config_mod.load(args.config, simulate=True)
        sim = simulator_config(
            cfg,
            seed=args.seed,
            keyed=False,
            latency_base_ms=args.latency_base_ms,
            latency_per_token_ms=args.latency_per_token_ms,
            throttle_headers=args.throttle_headers,
        )
        if args.time_scale is not None:
            sim = replace(sim, time_scale=args.time_scale)
        return sim
    regions = reference_regions(
        args.deployment,
        api_key=args.api_key,
        latency_base_ms=args.latency_base_ms,
        latency_per_token_ms=args.latency_per_token_ms,
        throttle_headers=args.throttle_headers,
    )
    return SimConfig(
        regions,
        time_scale=args.time_scale or 1.0,
        token_window_seconds=args.token_window_seconds,
        default_max_tokens=args.default_max_tokens,
        seed=args.seed,
    )


async def main_async(config: SimConfig, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Serve until cancelled (Ctrl-C)."""
    runner, url = await start(config, host, port)
    for region in config.regions:
        deployments = ", ".join(f"{d.name} {d.tpm} TPM" for d in region.deployments)
        print(f"{url}/{region.name}  ({deployments})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="balancer simulate", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(config_from_args(args), args.host, args.port))
    return 0
