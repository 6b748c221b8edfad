"""Response affinity: a stored response lives in the region that created it, and only
there can it be retrieved, deleted, cancelled, listed or continued.

The map response id -> (model, region, context tokens) is kept in the capacity store
(Redis when replicas share one), with a TTL matching the upstream's retention, so any
replica, restarted or not, sends a follow-up to the one region that can answer it.
Why not carry the region in the id itself: the id is the upstream's, and rewriting it
would mean rewriting it everywhere it appears (bodies, every stream event, output item
references, clients' own stores) and back on every call; an id a client got elsewhere,
or from the upstream's own list, would not carry it at all.
"""

from __future__ import annotations

import re

from balancer.capacity.base import Pin
from balancer.errors import ClientError
from balancer.gateway.call import Call
from balancer.gateway.runtime import ModelRoute, Runtime
from balancer.validate import ClientRequest

# What an id may look like before it is used as a store key or in an upstream URL:
# OpenAI's and Azure's are `resp_` and hex; anything else cannot exist.
RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")


async def owner(rt: Runtime, response_id: str, param: str | None = None) -> Pin:
    """Where the response lives; a 404 when no region holds it (unknown, expired or
    deleted), a 503 when the store that knows cannot be reached."""
    pin = await rt.store.pinned(response_id) if RESPONSE_ID.fullmatch(response_id) else None
    if pin is not None:
        return pin
    if rt.store.degraded:  # the shared map is out of reach: "unknown" would be a guess
        raise ClientError(503, "The gateway cannot reach its shared store to find the region "
                          "holding this response; retry shortly.", "store_unavailable",
                          type_="server_error", param=param, reason="store_unavailable",
                          headers={"Retry-After": "1"})
    shown = response_id[:256]
    if param == "previous_response_id":
        raise ClientError(404, f"Previous response with id '{shown}' not found.",
                          "previous_response_not_found", param=param, reason="not_found")
    raise ClientError(404, f"Response with id '{shown}' not found.", "not_found",
                      reason="not_found")


async def continued(rt: Runtime, req: ClientRequest, route: ModelRoute
                    ) -> tuple[ModelRoute, int]:
    """A create naming `previous_response_id` goes only to the region holding that
    response, and re-reads its whole context as input: the route narrowed to that
    region, and the context's tokens to add to the estimate."""
    previous = req.body.get("previous_response_id")
    if previous is None:
        return route, 0
    pin = await owner(rt, previous, "previous_response_id")
    narrowed = route.only(pin.region)
    if narrowed is None:
        raise ClientError(400, f"The previous response is held by region '{pin.region}', "
                          f"where model '{req.model}' is not deployed; continue it with a "
                          f"model deployed there (it was created with '{pin.model}').",
                          "previous_response_region_mismatch", param="model")
    return narrowed, pin.tokens


async def remember(call: Call, region: str, response_id: object, tokens: int) -> None:
    """Pin a response the region just created (and will store) to that region."""
    if not call.req.op.stateful or call.req.body.get("store") is False:
        return  # `store: false`: nothing is kept upstream, nothing to follow up
    if not isinstance(response_id, str) or not RESPONSE_ID.fullmatch(response_id):
        return
    await call.rt.store.pin(response_id, Pin(call.req.model, region, tokens),
                            call.config.responses.affinity_ttl_seconds)
