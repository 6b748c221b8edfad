"""`balancer serve | simulate | check | bench`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from urllib.parse import urlsplit

from aiohttp import web

from balancer import config as config_mod
from balancer import eventloop, logs, reload
from balancer.config import Config, ConfigError
from balancer.gateway import RUNTIME, create_app
from balancer.protocol import GatewayRunner
from balancer.sim import SimConfig

log = logging.getLogger("balancer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="balancer", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("BALANCER_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR (env BALANCER_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="regions.yaml path (env BALANCER_CONFIG; "
                                        "default ./regions.yaml)")
    serve.add_argument("--host", help="override listen.host")
    serve.add_argument("--port", type=int, help="override listen.port")
    serve.add_argument("--simulate", action="store_true",
                       help="replace every region by a local simulated region of the same TPM")
    serve.add_argument("--time-scale", type=float,
                       help="compress time (10 = a minute lasts 6 s); for simulations")
    serve.add_argument("--workers", type=_workers, default=1, metavar="N",
                       help="serve from N processes sharing the port (SO_REUSEPORT) and the "
                            "Redis store, under a supervisor; default 1: one process")
    # Internal: how the supervisor starts its workers (balancer.workers).
    serve.add_argument("--worker-id", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--sim-url", help=argparse.SUPPRESS)

    check = sub.add_parser("check", help="validate a regions.yaml and exit non-zero on error")
    check.add_argument("file", nargs="?", help="default: $BALANCER_CONFIG or ./regions.yaml")
    check.add_argument("--simulate", action="store_true",
                       help="tolerate unset endpoint/key variables, as serve --simulate does, "
                            "and skip getting Entra tokens for auth: entra regions")

    simulate = sub.add_parser("simulate", help="run simulated Azure-like regions")
    from balancer import sim

    sim.add_arguments(simulate)

    bench = sub.add_parser(
        "bench", help="run a benchmark (from a clone of the repository)",
        description="Benchmarks live in the repository's bench/ folder, which is not part of "
                    "the installed package: run them from a clone (`make bench` runs both). "
                    "`balancer bench balance --help` lists a benchmark's options.")
    bench.add_argument("benchmark",
                       choices=["balance", "overhead", "scenarios", "ptu", "learning",
                                "fairness", "streams"],
                       help="balance: quota delivered per strategy; overhead: cost per request; "
                            "streams: ~1,000 open streams on one replica; "
                            "scenarios: each later policy ON vs OFF where it should matter; "
                            "ptu: provisioned throughput first, standard for the excess; "
                            "learning: learned capacity per rate-limit header style; "
                            "fairness: client budgets and fair share of the pool")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's options")

    args = parser.parse_args(argv)
    if args.command == "bench":
        return run_bench(args.benchmark, args.options)
    logs.setup(args.log_level)
    try:
        eventloop.factory()  # a wrong BALANCER_EVENT_LOOP is refused before anything runs
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.command == "check":
        return run_check(args.file, simulate=args.simulate)
    if args.command == "simulate":
        try:
            sim_config = sim.config_from_args(args)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        return eventloop.run(_simulate(sim_config, args.host, args.port))
    return run_serve(args)


def run_bench(name: str, options: list[str]) -> int:
    """Import bench/ lazily: it sits beside the package in a clone, not inside it."""
    from pathlib import Path

    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "bench" / f"{name}.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            break
    else:
        print("balancer bench: bench/ not found: run it from a clone of the repository "
              "(the benchmarks are not part of the installed package)", file=sys.stderr)
        return 2
    import importlib

    return int(importlib.import_module(f"bench.{name}").main(options) or 0)


def run_check(file: str | None, *, simulate: bool = False) -> int:
    path = config_mod.config_path(file)
    try:
        cfg = config_mod.load(path, simulate=simulate)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not simulate and any(r.auth == "entra" for r in cfg.regions):
        # A credential that cannot get a token fails every request to its regions:
        # better found here than by the first client. Simulating, no identity is needed.
        from balancer import entra

        problems = asyncio.run(entra.probe(cfg.regions))
        if problems:
            index = {r.name: i for i, r in enumerate(cfg.regions)}
            for region, reason in problems:
                print(f"{path}: regions[{index[region.name]}].auth: region {region.name}: "
                      f"cannot get a Microsoft Entra token from identity "
                      f"{region.entra_client_id or 'default'}: {reason}", file=sys.stderr)
            return 1
    print(f"{path}: OK: {len(cfg.regions)} regions; {_capacity_summary(cfg)}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    path = config_mod.config_path(args.config)
    try:
        cfg = config_mod.load(path, simulate=args.simulate)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    listen = replace(cfg.listen, host=args.host or cfg.listen.host,
                     port=args.port if args.port is not None else cfg.listen.port)
    gateway = cfg.gateway
    if args.time_scale:
        gateway = replace(gateway, time_scale=args.time_scale)
    cfg = replace(cfg, listen=listen, gateway=gateway)
    if args.worker_id is not None:  # one of `--workers N`'s processes
        logs.set_worker(args.worker_id)
        return eventloop.run(_serve(cfg, simulate=args.simulate, sim_url=args.sim_url,
                                  worker=True))
    if args.workers > 1:
        if urlsplit(cfg.store.url).scheme == "memory":
            print(f"balancer serve --workers {args.workers}: the memory store cannot be "
                  "shared: each worker would spend every region's whole quota. Point "
                  "store.url (or REDIS_URL) at Redis, or serve with one worker.",
                  file=sys.stderr)
            return 2
        if cfg.listen.port == 0:
            print(f"balancer serve --workers {args.workers}: needs a fixed port (each worker "
                  "would get its own with port 0)", file=sys.stderr)
            return 2
        from balancer import workers

        return eventloop.run(workers.supervise(
            cfg, args.workers, log_level=args.log_level, simulate=args.simulate,
            time_scale=args.time_scale))
    return eventloop.run(_serve(cfg, simulate=args.simulate))


def _workers(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


async def _serve(cfg: Config, *, simulate: bool, sim_url: str | None = None,
                 worker: bool = False) -> int:
    """Serve until SIGTERM/SIGINT, then drain: readiness fails first, in-flight requests
    and streams get `drain_timeout_seconds` to finish, and the exit status is 0.
    SIGHUP reloads the config file (so does a change of its contents).
    A `worker` of `--workers N` (balancer.workers) shares the port with its siblings
    (SO_REUSEPORT), uses the supervisor's simulated regions at `sim_url` when simulating,
    and stops (drained) if its supervisor dies without forwarding a SIGTERM."""
    sim_runner = None
    rewrite: Callable[[Config], Config] = lambda c: c  # noqa: E731
    if simulate:
        from balancer import sim

        if sim_url is None:
            sim_runner, sim_url = await sim.start(sim.simulator_config(cfg))
            log.info("simulated regions at %s: %s", sim_url,
                     ", ".join(r.name for r in cfg.regions))
        rewrite = partial(sim.with_simulated_endpoints, base_url=sim_url)
    log.info("capacity: %s", _capacity_summary(cfg))
    overrides = (cfg.listen, cfg.gateway.time_scale)

    def load() -> Config:
        new = config_mod.load(cfg.source, simulate=simulate)
        new = replace(new, listen=overrides[0],
                      gateway=replace(new.gateway, time_scale=overrides[1]))
        return rewrite(new)

    app = create_app(rewrite(cfg))
    reload.install(app, cfg.source, load)
    gw = cfg.gateway
    # keepalive_timeout (aiohttp's, public): a connection without a complete request head
    # that long after its start or its previous answer is closed: slow headers are bounded.
    runner = GatewayRunner(app, access_log=None, shutdown_timeout=gw.drain_timeout_seconds,
                           keepalive_timeout=gw.header_timeout_seconds)
    await runner.setup()
    site = web.TCPSite(runner, cfg.listen.host, cfg.listen.port, reuse_address=True,
                       reuse_port=worker or None)
    await site.start()
    # The store URL as redacted_url gives it: a password in it shows as ***.
    log.info("balancer listening on http://%s:%d (store %s at %s, config %s, loop %s)",
             cfg.listen.host, cfg.listen.port, app[RUNTIME].store.name,
             cfg.store.redacted_url, cfg.source, eventloop.name())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(
        app[reload.RELOADER].reload("SIGHUP")))
    if worker:
        orphaned = asyncio.create_task(_orphaned(os.getppid(), stop))
    await stop.wait()
    if worker:
        orphaned.cancel()

    rt = app[RUNTIME]
    rt.draining = True  # /readyz answers 503 from now on
    log.info("draining: readiness off, %d requests in flight, up to %.0f s",
             rt.in_flight, rt.config.gateway.drain_timeout_seconds)
    await asyncio.sleep(rt.config.gateway.shutdown_delay_seconds)
    await runner.cleanup()  # stops listening, waits for in-flight handlers, then closes
    if sim_runner is not None:
        await sim_runner.cleanup()
    log.info("stopped")
    return 0


async def _orphaned(supervisor: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor was killed (SIGKILL: nothing forwarded) stops too,
    rather than serve on unsupervised."""
    while os.getppid() == supervisor:  # noqa: ASYNC110 (polled: nothing signals it)
        await asyncio.sleep(1.0)
    log.error("the supervisor (pid %d) is gone: stopping", supervisor)
    stop.set()


def _capacity_summary(cfg: Config) -> str:
    """Total TPM per model and priority tier, e.g. 'gpt-4: 520,000 TPM (+30,000 fallback)'."""
    parts = []
    for model, targets in cfg.models.items():
        best = min(t.priority for t in targets)
        main = sum(t.deployment.tpm for t in targets if t.priority == best)
        rest = sum(t.deployment.tpm for t in targets if t.priority != best)
        parts.append(f"{model}: {main:,} TPM" + (f" (+{rest:,} fallback)" if rest else ""))
    return "; ".join(parts)


async def _simulate(sim_config: SimConfig, host: str, port: int) -> int:
    from balancer import sim

    runner, url = await sim.start(sim_config, host=host, port=port)
    log.info("simulated regions at %s: %s", url, ", ".join(r.name for r in sim_config.regions))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
