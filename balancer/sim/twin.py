"""`serve --simulate`: every region of a config replaced by a local simulated region
with the same TPM and RPM, served in-process. How `make run` works with no cloud."""

from __future__ import annotations

from dataclasses import replace

from balancer.config import Config, Region, Secret
from balancer.sim.config import SimConfig, SimDeployment, SimRegion


def sim_key(region: str) -> str:
    return f"sim-key-{region}"


def simulator_config(config: Config, *, seed: int | None = None, keyed: bool = True,
                     **knobs: float) -> SimConfig:
    """The simulated twin of each region: same deployment names, limits and sku (a
    `provisioned` one is simulated as a PTU), and the same burst windows as the gateway's
    buckets (Azure: ~10 s for tokens, 1 s for requests).
    `keyed`: each region requires `sim_key(name)`; otherwise any key is accepted."""
    regions = [
        SimRegion(
            name=r.name,
            deployments=[SimDeployment(d.deployment, d.tpm, d.rpm, d.sku) for d in _unique(r)],
            api_key=sim_key(r.name) if keyed else None,
            **knobs,
        )
        for r in config.regions
    ]
    gw = config.gateway
    return SimConfig(regions=regions, time_scale=gw.time_scale,
                     token_window_seconds=gw.burst_seconds,
                     request_window_seconds=gw.rpm_burst_seconds, seed=seed)


def _unique(region: Region) -> list:
    seen: dict[str, object] = {}
    for dep in region.deployments.values():
        seen.setdefault(dep.deployment, dep)
    return list(seen.values())


def with_simulated_endpoints(config: Config, base_url: str) -> Config:
    """Point every region at its simulated twin under `base_url`, with its simulated key.
    `auth: entra` regions become key regions too: under `serve --simulate` (`make run`)
    no managed identity endpoint exists to get tokens from (tests that want Entra run
    sim.identity's and set the regions' `auth` themselves)."""
    regions = []
    for r in config.regions:
        endpoint = f"{base_url}/{r.name}" + ("/v1" if r.kind == "openai" else "")
        regions.append(replace(r, endpoint=endpoint, api_key=Secret(sim_key(r.name)),
                               auth="key", entra_client_id=None))
    return replace(config, regions=tuple(regions))
