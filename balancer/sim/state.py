"""The simulator's run-time state (regions, their deployments' buckets, their stored
responses, the random source, the clock), shared by every handler through the app key
`SIMULATOR`."""

from __future__ import annotations

import asyncio
import copy
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from balancer.sim.buckets import DeploymentState
from balancer.sim.config import FLOAT_KNOBS, SimConfig, SimRegion, validate
from balancer.sim.errors import ApiError
from balancer.sim.store import ResponseStore

Clock = Callable[[], float]


class Simulator:
    """The whole state of one simulator app, kept under `SIMULATOR` in the app."""

    def __init__(self, config: SimConfig, clock: Clock = time.monotonic) -> None:
        validate(config)
        self.config = config
        self.clock = clock
        self.rng = random.Random(config.seed)
        self.regions = {r.name: r for r in copy.deepcopy(config.regions)}
        now = clock()
        self.deployments = {
            (r.name, d.name): DeploymentState(d, config, now)
            for r in self.regions.values()
            for d in r.deployments
        }
        # Responses API objects live in the region that made them, as on Azure and OpenAI
        self.stores = {name: ResponseStore() for name in self.regions}
        # 401s answered, per region: "unauthorized" (all) and per reason (sim.routes)
        self.auth: dict[str, Counter[str]] = {name: Counter() for name in self.regions}
        self.closing = asyncio.Event()  # set at shutdown: releases hung requests
        for region in self.regions.values():
            self._set_cotenant(region, now)

    def region(self, name: str) -> SimRegion:
        region = self.regions.get(name)
        if region is None:
            raise ApiError(404, f"Resource not found: no region {name!r}", "404")
        return region

    def unauthorized(self, region: SimRegion, reason: str) -> None:
        self.auth[region.name].update(("unauthorized", reason))

    def deployment(self, region: SimRegion, name: str) -> DeploymentState:
        dep = self.deployments.get((region.name, name))
        if dep is None:
            message = f"The API deployment {name!r} does not exist in region {region.name!r}."
            raise ApiError(404, message, "DeploymentNotFound")
        return dep

    def set_knobs(self, region: SimRegion, knobs: dict[str, Any]) -> None:
        for key, value in knobs.items():
            setattr(region, key, float(value) if key in FLOAT_KNOBS else value)
        self._set_cotenant(region, self.clock())

    def _set_cotenant(self, region: SimRegion, now: float) -> None:
        for dep in self._deployments_of(region):
            dep.tokens.advance(now)  # settle the time so far at the old drain rate
            dep.tokens.drain = region.cotenant_tpm / 60 * self.config.time_scale

    def _deployments_of(self, region: SimRegion) -> list[DeploymentState]:
        return [self.deployments[(region.name, d.name)] for d in region.deployments]

    def completion_length(self, budget: int) -> int:
        low, high = self.config.completion_fraction
        return max(1, round(self.rng.uniform(low, high) * budget))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{self.rng.getrandbits(64):016x}"


SIMULATOR = web.AppKey("balancer.simulator", Simulator)
