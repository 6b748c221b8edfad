"""The URL families a region serves, how each authenticates and names its deployment, and
the create handlers that resolve a request to a `Target`:

- Azure, deployment in the path: /openai/deployments/{deployment}/{op}?api-version=...
- Azure, dated, deployment as body["model"]: /openai/{op}?api-version=... (responses)
- Azure v1 (Azure's recommended surface since August 2025): /openai/v1/{op}, no api-version
- OpenAI: /v1/{op}, body["model"], `Authorization: Bearer`
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from balancer.sim import identity
from balancer.sim.config import SimRegion
from balancer.sim.errors import ApiError
from balancer.sim.handlers import Target, serve
from balancer.sim.state import SIMULATOR

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Style:
    """One URL family: its keys, whether it needs an api-version, whose headers it sends."""

    name: str
    api_key: bool  # accepts the `api-key` header
    bearer: bool  # accepts `Authorization: Bearer <key>`
    dated: bool  # needs an `api-version` query; Azure answers 404 without one
    azure: bool  # Azure's answers (the region's `responses_headers` knob applies)


AZURE = Style("azure", api_key=True, bearer=False, dated=True, azure=True)
AZURE_V1 = Style("azure-v1", api_key=True, bearer=True, dated=False, azure=True)
OPENAI = Style("openai", api_key=False, bearer=True, dated=False, azure=False)


def _key(request: web.Request, style: Style) -> str | None:
    if style.api_key and request.headers.get("api-key"):
        return request.headers["api-key"]
    if style.bearer:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return key.strip() or None
    return None


def _authorize(region: SimRegion, key: str | None) -> None:
    if not key:
        raise ApiError(401, "Access denied due to missing subscription key.", "401", "auth_error")
    if region.api_key is not None and key != region.api_key:
        message = "Access denied due to invalid subscription key or wrong API endpoint."
        raise ApiError(401, message, "401", "auth_error")


def open_call(request: web.Request, style: Style) -> tuple[SimRegion, str]:
    """The request's region, its key checked, and its api-version ("v1" when undated; a
    v1 route ignores an api-version query)."""
    sim = request.app[SIMULATOR]
    region = sim.region(request.match_info["region"])
    if region.auth == "entra":  # key auth disabled: a valid Entra token, whatever the style
        reason = identity.authorize(request.headers, region.entra_secret or
                                    sim.config.entra_secret, sim.config.entra_clock_skew_seconds)
        if reason is not None:
            sim.unauthorized(region, reason)
            raise identity.refusal(reason)
    else:
        try:
            _authorize(region, _key(request, style))
        except ApiError:
            sim.unauthorized(region, "key")
            raise
    api_version = request.query.get("api-version") if style.dated else "v1"
    if not api_version:
        raise ApiError(404, "Resource not found", "404")
    return region, api_version


async def read_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, f"Request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object.", "invalid_json")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "You must provide a model parameter.", "missing_required_parameter")
    return model


def create_handler(style: Style, *, deployment_in_path: bool = False) -> Handler:
    """POST {op}: the deployment from the path, or else the body's `model`."""

    async def handle(request: web.Request) -> web.StreamResponse:
        region, api_version = open_call(request, style)
        body = await read_body(request)
        if deployment_in_path:
            deployment = request.match_info["deployment"]
        else:
            deployment = _model(body)
        op = request.match_info["op"]
        return await serve(request, Target(region, deployment, op, body, api_version, style.azure))

    return handle
