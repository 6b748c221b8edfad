"""Shared fixtures: real simulated regions and a real gateway, both over HTTP."""

from __future__ import annotations

import hmac
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from balancer import config as config_mod
from balancer import logs, sim
from balancer.capacity.base import CapacityStore
from balancer.config import Config
from balancer.gateway import clients, create_app
from balancer.protocol import GatewayRunner
from balancer.sim import SimConfig, SimDeployment, SimRegion

SMALL = {"big": 60_000, "medium": 30_000, "small": 12_000}


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Any:
    """`balancer check` and other in-process CLI calls install a JSON handler on the
    test's captured stderr; once pytest closes that, later tests' logs would fail."""
    root = logging.getLogger()
    handlers, level, stream = root.handlers[:], root.level, logs._stream
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._stream = stream


@pytest.fixture
def digest_comparisons(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The lengths of both sides of every hmac.compare_digest the key checks make from
    now on (the real comparison still runs): a constant-time check compares digests."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(clients.hmac, "compare_digest", spy)
    return calls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway_config(regions: dict[str, int], *, model: str = "gpt-4", fallback: int | None = None,
                   **gateway: Any) -> Config:
    """A config for `regions` (name -> TPM), endpoints filled in by `with_simulated_endpoints`."""
    lines = ["regions:"]
    for name, tpm in regions.items():
        lines += [f"  - name: {name}", "    kind: azure", "    endpoint: http://placeholder",
                  '    api_version: "2024-06-01"', "    deployments:",
                  f"      {model}: {{deployment: {model}-dep, tpm: {tpm}}}",
                  f"      emb: {{deployment: emb-dep, tpm: {tpm}}}"]
    if fallback:
        lines += ["  - name: fallback", "    kind: openai", "    endpoint: http://placeholder",
                  "    priority: 1", "    deployments:",
                  f"      {model}: {{deployment: {model}-oai, tpm: {fallback}}}"]
    cfg = config_mod.parse("\n".join(lines), "test.yaml", {})
    return replace(cfg, gateway=replace(cfg.gateway, **gateway))


class Stack:
    """A simulator serving `config`'s regions and a gateway in front of it."""

    def __init__(self, sim_url: str, gw_url: str, app: web.Application):
        self.sim_url = sim_url
        self.url = gw_url
        self.app = app

    async def sim_stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.sim_url}/_sim/stats") as r:
            return (await r.json())["regions"]

    async def knobs(self, region: str, **knobs: Any) -> None:
        async with aiohttp.ClientSession() as s, s.post(
                f"{self.sim_url}/_sim/regions/{region}", json=knobs) as r:
            assert r.status == 200, await r.text()


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def stack() -> AsyncIterator[StackFactory]:
    runners: list[web.AppRunner] = []

    async def start(config: Config, *, store: CapacityStore | None = None,
                    api_keys: tuple[bytes, ...] = (), sim_knobs: dict[str, Any] | None = None,
                    seed: int = 7) -> Stack:
        sim_cfg = sim.simulator_config(config, seed=seed, **(sim_knobs or {}))
        sim_runner, sim_url = await sim.start(sim_cfg)
        runners.append(sim_runner)
        cfg = sim.with_simulated_endpoints(config, sim_url)
        app = create_app(cfg, store=store, api_keys=api_keys)
        runner = GatewayRunner(app, access_log=None)  # what `balancer serve` runs
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return Stack(sim_url, f"http://127.0.0.1:{port}", app)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


__all__ = ["SMALL", "SimConfig", "SimDeployment", "SimRegion", "Stack", "free_port",
           "gateway_config"]
