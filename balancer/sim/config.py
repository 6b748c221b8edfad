"""What the simulator serves: regions, their deployments and limits, and the fault knobs
a region's control endpoint can change at run time."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

REFERENCE_TPM: dict[str, int] = {
    "canadaeast": 100_000,
    "japaneast": 100_000,
    "eastus2": 100_000,
    "uksouth": 100_000,
    "australiaeast": 40_000,
    "switzerlandnorth": 40_000,
    "eastus": 20_000,
    "francecentral": 20_000,
}


@dataclass
class SimDeployment:
    name: str
    tpm: int
    rpm: int | None = None  # default: 6 per 1,000 TPM, as Azure assigns

    def __post_init__(self) -> None:
        if self.rpm is None:
            self.rpm = max(1, self.tpm * 6 // 1000)


@dataclass
class SimRegion:
    name: str
    deployments: list[SimDeployment]
    api_key: str | None = None  # None: any non-empty key is accepted
    latency_base_ms: float = 20.0
    latency_per_token_ms: float = 0.5
    fail_rate: float = 0.0
    fail_status: int = 500
    hang: bool = False
    reset_after_chunks: int | None = None
    malformed: str | None = None  # "json" | "html"
    throttle_headers: str = "normal"  # "normal" | "none" | "minus1"
    # Azure's Responses API reports remaining counts as "-1" and often sends no retry-after;
    # "normal": its answers carry the same headers as chat
    responses_headers: str = "azure"  # "azure" | "normal"
    slowdown: float = 1.0
    cotenant_tpm: float = 0.0


@dataclass
class SimConfig:
    regions: list[SimRegion]
    time_scale: float = 1.0
    token_window_seconds: float = 10.0
    request_window_seconds: float = 1.0
    default_max_tokens: int = 1024
    completion_fraction: tuple[float, float] = (0.5, 1.0)
    seed: int | None = None


def reference_regions(
    deployment: str = "gpt-4",
    extra_deployments: Sequence[SimDeployment] = (),
    *,
    api_key: str | None = None,
    **knobs: Any,
) -> list[SimRegion]:
    """The eight reference regions of DESIGN.md, each with `deployment` at its TPM plus copies
    of `extra_deployments`; `knobs` (latency_base_ms=..., ...) apply to every region."""
    return [
        SimRegion(
            name,
            [SimDeployment(deployment, tpm), *(replace(d) for d in extra_deployments)],
            api_key=api_key,
            **knobs,
        )
        for name, tpm in REFERENCE_TPM.items()
    ]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _non_negative(v: Any) -> bool:
    return _number(v) and v >= 0


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


KNOBS: dict[str, Callable[[Any], bool]] = {
    "api_key": lambda v: v is None or (isinstance(v, str) and v != ""),
    "latency_base_ms": _non_negative,
    "latency_per_token_ms": _non_negative,
    "fail_rate": lambda v: _number(v) and 0 <= v <= 1,
    "fail_status": lambda v: _integer(v) and 400 <= v <= 599,
    "hang": lambda v: isinstance(v, bool),
    "reset_after_chunks": lambda v: v is None or (_integer(v) and v >= 0),
    "malformed": lambda v: v in (None, "json", "html"),
    "throttle_headers": lambda v: v in ("normal", "none", "minus1"),
    "responses_headers": lambda v: v in ("azure", "normal"),
    "slowdown": _non_negative,
    "cotenant_tpm": _non_negative,
}
FLOAT_KNOBS = {"latency_base_ms", "latency_per_token_ms", "fail_rate", "slowdown", "cotenant_tpm"}


def region_knobs(region: SimRegion) -> dict[str, Any]:
    """The region's run-time knobs, as the control endpoint reports them (the key withheld)."""
    return {k: getattr(region, k) for k in KNOBS if k != "api_key"}


def validate(config: SimConfig) -> None:
    if config.time_scale <= 0 or config.token_window_seconds <= 0:
        raise ValueError("time_scale and token_window_seconds must be positive")
    if config.request_window_seconds <= 0 or config.default_max_tokens < 1:
        raise ValueError("request_window_seconds and default_max_tokens must be positive")
    names = [r.name for r in config.regions]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate region names in {names}")
    for region in config.regions:
        deployments = [d.name for d in region.deployments]
        if len(set(deployments)) != len(deployments):
            raise ValueError(f"duplicate deployments in region {region.name!r}")
