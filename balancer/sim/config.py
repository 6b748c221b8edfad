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


SKUS = ("standard", "provisioned")


@dataclass
class SimDeployment:
    name: str
    tpm: int
    rpm: int | None = None  # default: 6 per 1,000 TPM, as Azure assigns
    # "provisioned": a PTU deployment (buckets.DeploymentState): `tpm` is its real
    # throughput, it admits while its utilization is under 100%, has no RPM limit
    sku: str = "standard"

    def __post_init__(self) -> None:
        if self.rpm is None:
            self.rpm = max(1, self.tpm * 6 // 1000)


# What a region's rate-limit headers say (`throttle_headers`), one style of a real upstream
# each. Remaining counts on successes / on 429s; the 429's wait:
#   normal            real counts on both; retry-after (whole s) and retry-after-ms (Azure)
#   precise           real counts on successes only; retry-after-ms and retry-after
#   minus1            "-1" on both; retry-after and retry-after-ms
#   seconds           "-1" on both; a whole-second retry-after only (Azure's Responses API
#                     when it sends one, microsoft/aoai-api-simulator)
#   retry-after-only  no x-ratelimit-* headers; a whole-second retry-after only
#   none              no headers at all: the wait is only in the 429's message
# The whole seconds of `seconds` and `retry-after-only` are simulated seconds, written in
# real ones (at time_scale 10: tenths), so compressed time keeps their coarseness.
THROTTLE_HEADERS = ("normal", "precise", "minus1", "seconds", "retry-after-only", "none")


@dataclass
class SimRegion:
    name: str
    deployments: list[SimDeployment]
    api_key: str | None = None  # None: any non-empty key is accepted
    # "entra": key auth disabled (disableLocalAuth): api-key gets 401, a bearer token must
    # be one the identity endpoint (sim.identity) signed with `entra_secret`, unexpired
    auth: str = "key"  # "key" | "entra"
    entra_secret: str | None = None  # None: SimConfig.entra_secret; a knob to rotate it
    latency_base_ms: float = 20.0
    latency_per_token_ms: float = 0.5
    fail_rate: float = 0.0
    fail_status: int = 500
    hang: bool = False
    reset_after_chunks: int | None = None
    malformed: str | None = None  # "json" | "html"
    # Extra bytes in every answer: spaces after a whole JSON body (still valid JSON), SSE
    # comment events after a stream's first event (ignored by SSE clients)
    pad_bytes: int = 0
    throttle_headers: str = "normal"  # one of THROTTLE_HEADERS
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
    entra_secret: str | None = None  # the identity endpoint's signing secret (sim.identity)
    # Entra accepts tokens this long after their expiry (Microsoft.IdentityModel: 5 min)
    entra_clock_skew_seconds: float = 300.0


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
    "auth": lambda v: v in ("key", "entra"),
    "entra_secret": lambda v: v is None or (isinstance(v, str) and v != ""),
    "latency_base_ms": _non_negative,
    "latency_per_token_ms": _non_negative,
    "fail_rate": lambda v: _number(v) and 0 <= v <= 1,
    "fail_status": lambda v: _integer(v) and 400 <= v <= 599,
    "hang": lambda v: isinstance(v, bool),
    "reset_after_chunks": lambda v: v is None or (_integer(v) and v >= 0),
    "malformed": lambda v: v in (None, "json", "html"),
    "pad_bytes": lambda v: _integer(v) and 0 <= v <= 1 << 30,
    "throttle_headers": lambda v: v in THROTTLE_HEADERS,
    "responses_headers": lambda v: v in ("azure", "normal"),
    "slowdown": _non_negative,
    "cotenant_tpm": _non_negative,
}
SECRET_KNOBS = {"api_key", "entra_secret"}
FLOAT_KNOBS = {"latency_base_ms", "latency_per_token_ms", "fail_rate", "slowdown", "cotenant_tpm"}


def region_knobs(region: SimRegion) -> dict[str, Any]:
    """The region's run-time knobs, as the control endpoint reports them (secrets withheld)."""
    return {k: getattr(region, k) for k in KNOBS if k not in SECRET_KNOBS}


def validate(config: SimConfig) -> None:
    if config.time_scale <= 0 or config.token_window_seconds <= 0:
        raise ValueError("time_scale and token_window_seconds must be positive")
    if config.request_window_seconds <= 0 or config.default_max_tokens < 1:
        raise ValueError("request_window_seconds and default_max_tokens must be positive")
    if config.entra_clock_skew_seconds < 0:
        raise ValueError("entra_clock_skew_seconds must be >= 0")
    names = [r.name for r in config.regions]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate region names in {names}")
    for region in config.regions:
        deployments = [d.name for d in region.deployments]
        if len(set(deployments)) != len(deployments):
            raise ValueError(f"duplicate deployments in region {region.name!r}")
        if not KNOBS["auth"](region.auth):
            raise ValueError(f"region {region.name!r}: auth must be 'key' or 'entra'")
        for d in region.deployments:
            if d.sku not in SKUS:
                raise ValueError(f"deployment {d.name!r}: sku must be one of {SKUS}")
