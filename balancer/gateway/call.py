"""One client request on its way through the attempts, and an attempt that failed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aiohttp import web

from balancer import cost, errors, validate
from balancer.config import Config, GatewayConfig
from balancer.gateway.runtime import ANONYMOUS, Record, Runtime, Tenant, new_id
from balancer.tenancy import ClientLimits


@dataclass(slots=True)
class Call:
    """What every step of a request's path needs. `config` is the config as it was when
    the request arrived, so a reload never changes it midway."""

    rt: Runtime
    request: web.Request
    req: validate.ClientRequest
    estimate: cost.Estimate
    config: Config
    record: Record
    priority: int = 0  # rank of its class in the admission queue: higher goes first
    tenant: Tenant = ANONYMOUS  # who it is from (clients.authorize)
    ticket: str = field(default_factory=new_id)  # its place in the queue
    wait_until: float | None = None  # loop time its wait budget ends (set on first admit)
    first_admit: float = 0.0  # loop time of its first admission attempt
    client: ClientLimits | None = None  # its client's budget and fair share on this model
    demanded: bool = False  # its cost already counted as the client's demand

    @property
    def gw(self) -> GatewayConfig:
        return self.config.gateway


@dataclass
class Failure:
    """An attempt that may be retried elsewhere; if it is the last, the client gets it."""

    reason: str  # label: throttled, status_5xx, timeout, connect, bad_response, auth
    region: str
    status: int
    body: bytes
    retry_after: float | None = None

    def response(self) -> web.Response:
        headers = {"x-balancer-region": self.region}
        if self.retry_after is not None:
            headers["Retry-After"] = errors.retry_after_header(self.retry_after)
        if is_openai_error(self.body):  # relay the region's own error as it was
            return web.Response(status=self.status, body=self.body, headers=headers,
                                content_type="application/json")
        return errors.response(self.status, f"The upstream region failed ({self.reason}).",
                               self.reason, type_="upstream_error", headers=headers)


def is_openai_error(body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and isinstance(payload.get("error"), dict)
