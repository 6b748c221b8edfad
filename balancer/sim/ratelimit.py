"""Rate-limit headers and 429 answers, as Azure sends them."""

from __future__ import annotations

import math

from balancer.sim.buckets import DeploymentState
from balancer.sim.config import SimRegion
from balancer.sim.errors import ApiError
from balancer.sim.state import Simulator

_AZURE_OPERATION = {
    "chat/completions": "ChatCompletions_Create",
    "completions": "Completions_Create",
    "embeddings": "Embeddings_Create",
    "responses": "Responses_Create",
}


def ratelimit_headers(
    region: SimRegion, dep: DeploymentState, opaque: bool = False
) -> dict[str, str]:
    """The remaining-quota headers; `opaque`: Azure's Responses API, which reports "-1"."""
    if region.throttle_headers == "none":
        return {}
    if opaque or region.throttle_headers == "minus1":
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
    limit = "call" if dep.requests.level < 1 else "token"
    message = (
        f"Requests to the {_AZURE_OPERATION[op]} Operation under Azure OpenAI API version "
        f"{api_version} have exceeded {limit} rate limit of your current OpenAI S0 pricing tier. "
        f"Please retry after {seconds} second{'s' if seconds > 1 else ''}."
    )
    headers = ratelimit_headers(region, dep, opaque)
    if region.throttle_headers != "none" and not opaque:
        headers["retry-after"] = str(seconds)
        headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
    return ApiError(429, message, "429", "rate_limit_exceeded", headers)
