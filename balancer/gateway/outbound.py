"""One request to a region with its credentials: its key, or a Microsoft Entra token
(`balancer.entra`). An Entra region answering 401 gets one more try with a refreshed
token, here, before anything reached the client: a token revoked or rejected before its
expiry (a rotated signing key) would otherwise fail every request until the cache
refreshes on its own. A second 401 is the region's (REGION_FAULTS: its circuit counts it).
"""

from __future__ import annotations

import aiohttp

from balancer import upstream
from balancer.config import Secret, Target
from balancer.entra import EntraAuth


async def send(session: aiohttp.ClientSession, auth: EntraAuth, target: Target,
               token: Secret | None, method: str, url: str, data: bytes | None,
               limits: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
    """The region's response to a request carrying `token` (`auth.token(region)`: the
    caller gets it first, so a fetch is not timed as the region's latency). Raises
    `entra.AuthError` when a refresh gets no token, and what the session raises
    (TRANSPORT_ERRORS)."""
    region = target.region
    up = await session.request(method, url, data=data, timeout=limits,
                               headers=upstream.headers(target, token))
    if token is None or up.status != 401:
        return up
    # Its body is left unread: the 401 is the answer if there is no retry, and the caller
    # reads it within max_upstream_body_bytes (released unread, the connection closes).
    try:
        fresh = await auth.refresh(region, token)
    except BaseException:
        up.release()
        raise
    if fresh is None:
        auth.refused(region)
        return up
    up.release()
    up = await session.request(method, url, data=data, timeout=limits,
                               headers=upstream.headers(target, fresh))
    if up.status == 401:
        auth.refused(region)
    return up
