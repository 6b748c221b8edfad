"""Rate-limit headers and 429 answers, as Azure sends them."""

from __future__ import annotations

import math

from balancer.sim.buckets import DeploymentState
from balancer.sim.config import SimRegion
from balancer.sim.errors import ApiError
from balancer.sim.state import Simulator

UTILIZATION = "azure-openai-deployment-utilization"  # a percentage, e.g. "85.3%"
_AZURE_OPERATION = {
    "chat/completions": "ChatCompletions_Create",
    "completions": "Completions_Create",
    "embeddings": "Embeddings_Create",
    "responses": "Responses_Create",
}


def ratelimit_headers(
    region: SimRegion, dep: DeploymentState, opaque: bool = False, refused: bool = False
) -> dict[str, str]:
    """The remaining-quota headers (of a 429 when `refused`), as the region's
    `throttle_headers` style sends them; `opaque`: Azure's Responses API, which reports
    "-1". A provisioned deployment reports its utilization instead, never remaining counts."""
    style = region.throttle_headers
    if style in ("none", "retry-after-only") or (refused and style == "precise"):
        return {}
    if dep.provisioned:
        return {UTILIZATION: f"{100 * dep.utilization():.1f}%"}
    if opaque or style in ("minus1", "seconds"):
        tokens = requests = "-1"
    else:
        tokens = str(max(0, math.floor(dep.tokens.level)))
        requests = str(max(0, math.floor(dep.requests.level)))
    return {"x-ratelimit-remaining-tokens": tokens, "x-ratelimit-remaining-requests": requests}


def throttled(
    sim: Simulator,
    region: SimRegion,
    dep: DeploymentState,
    op: str,
    api_version: str,
    wait: float,
    opaque: bool = False,
) -> ApiError:
    """The 429 for a request that would fit in `wait` real seconds; `opaque` answers (Azure's
    Responses API) say when only in the message: no retry-after headers."""
    if math.isinf(wait):  # a co-tenant eats the whole refill: suggest a simulated minute
        wait = 60 / sim.config.time_scale
    seconds = max(1, math.ceil(wait))
    if dep.provisioned:  # fully used (its normal state under load): the precise wait
        return _provisioned_throttled(region, dep, op, api_version, wait, seconds)
    limit = "call" if dep.requests.level < 1 else "token"
    message = (
        f"Requests to the {_AZURE_OPERATION[op]} Operation under Azure OpenAI API version "
        f"{api_version} have exceeded {limit} rate limit of your current OpenAI S0 pricing tier. "
        f"Please retry after {seconds} second{'s' if seconds > 1 else ''}."
    )
    headers = ratelimit_headers(region, dep, opaque, refused=True)
    if region.throttle_headers in ("seconds", "retry-after-only") and not opaque:
        headers["retry-after"] = whole_seconds(wait, sim.config.time_scale)
    elif region.throttle_headers != "none" and not opaque:
        headers["retry-after"] = str(seconds)
        headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
    return ApiError(429, message, "429", "rate_limit_exceeded", headers)


def whole_seconds(wait: float, time_scale: float) -> str:
    """`wait` real seconds rounded up to whole simulated seconds, written in real seconds:
    "1" at time_scale 1, "0.3" at 10 (a power-of-ten step no finer than a simulated
    second), so the gateway reads the same coarseness a real region's header has."""
    step = 10.0 ** min(0, math.ceil(math.log10(1 / time_scale) - 1e-9))
    digits = max(0, -round(math.log10(step)))
    return f"{max(1, math.ceil(wait / step - 1e-9)) * step:.{digits}f}"


def _provisioned_throttled(region: SimRegion, dep: DeploymentState, op: str,
                           api_version: str, wait: float, seconds: int) -> ApiError:
    """A PTU at 100% utilization: `retry-after-ms`, the time until it is under 100%
    (Azure's docs), and `retry-after`; its utilization, and no remaining counts."""
    message = (
        f"Requests to the {_AZURE_OPERATION[op]} Operation under Azure OpenAI API version "
        f"{api_version} have exceeded the provisioned throughput of this deployment. "
        f"Please retry after {seconds} second{'s' if seconds > 1 else ''}."
    )
    headers = ratelimit_headers(region, dep)
    if region.throttle_headers != "none":
        headers["retry-after"] = str(seconds)
        headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
    return ApiError(429, message, "429", "rate_limit_exceeded", headers)
