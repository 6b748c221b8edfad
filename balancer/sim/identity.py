"""Microsoft Entra ID, simulated: a managed identity endpoint as App Service and Container
Apps serve one, and the check an Entra-only region (`SimRegion.auth = "entra"`, key auth
disabled) makes of the bearer tokens it issues.

The endpoint speaks what azure-identity 1.27's managed identity credential sends when
IDENTITY_ENDPOINT and IDENTITY_HEADER are set (azure/identity/_credentials/app_service.py)
and reads (azure/identity/_internal/managed_identity_client.py, `_process_response`):

    GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource={resource}[&client_id={id}]
    X-IDENTITY-HEADER: {IDENTITY_HEADER}
    -> 200 {"access_token", "expires_on": "<unix seconds>", "resource", "token_type"}

Its tokens are HS256 JWTs signed with a secret the simulated regions share
(`SimConfig.entra_secret`, or a region's `entra_secret` knob to simulate a rotated key),
carrying the audience and expiry a region checks. Tests: `IdentityEndpoint` holds the
settings (lifetime, refused client ids) and counts what it issued.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from balancer.sim.errors import ApiError

AUDIENCE = "https://cognitiveservices.azure.com"  # the scope .../.default, as a resource
API_VERSION = "2019-08-01"
SYSTEM = "system-assigned"  # the client id counted for requests naming none
# What Azure OpenAI answers an Entra-only resource (disableLocalAuth) ...
KEY_DISABLED = "Key based authentication is disabled for this resource."
# ... and a missing, invalid, foreign or expired token.
BAD_TOKEN = ("Unauthorized. Access token is missing, invalid, audience is incorrect "
             f"({AUDIENCE}), or have expired.")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, signed: str) -> str:
    return _b64(hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest())


def issue(secret: str, client_id: str, expires_on: int, serial: int,
          audience: str = AUDIENCE) -> str:
    """An HS256 JWT for `audience`, as `client_id`, valid until `expires_on`."""
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    claims = {"aud": audience, "appid": client_id, "exp": expires_on, "iss": "balancer-sim",
              "tid": "simulated", "jti": serial}
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{header}.{payload}.{_sign(secret, f'{header}.{payload}')}"


def check(token: str, secret: str | None, now: float, skew: float) -> str | None:
    """Why a region refuses `token` ("invalid_token", "expired_token"), or None."""
    parts = token.split(".")
    if secret is None or len(parts) != 3 or not hmac.compare_digest(
            _sign(secret, f"{parts[0]}.{parts[1]}"), parts[2]):
        return "invalid_token"
    try:
        claims = json.loads(_unb64(parts[1]))
        expires_on = float(claims["exp"])
        audience = claims["aud"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return "invalid_token"
    if audience != AUDIENCE:
        return "invalid_token"
    return "expired_token" if now > expires_on + skew else None


def authorize(headers: Mapping[str, str], secret: str | None, skew: float) -> str | None:
    """An Entra-only region's check: why it answers 401 (the reason), or None."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "key_disabled" if headers.get("api-key") else "missing"
    return check(token.strip(), secret, time.time(), skew)


def refusal(reason: str) -> ApiError:
    if reason == "key_disabled":
        return ApiError(401, KEY_DISABLED, "AuthenticationTypeDisabled", "auth_error")
    return ApiError(401, BAD_TOKEN, "401", "auth_error")


@dataclass
class IdentityEndpoint:
    """The endpoint's settings and counters (a test changes and reads them in-process)."""

    secret: str
    header: str = "sim-identity-header"  # what IDENTITY_HEADER must say
    lifetime_seconds: float = 3600.0
    refuse: set[str] = field(default_factory=set)  # client ids with no such identity
    issued: Counter[str] = field(default_factory=Counter)  # per client id (SYSTEM: none)
    tokens: deque[str] = field(default_factory=lambda: deque(maxlen=10_000))  # for leak checks
    clock: Callable[[], float] = time.time
    _serial: itertools.count[int] = field(default_factory=itertools.count)


IDENTITY = web.AppKey("balancer.sim.identity", IdentityEndpoint)


def _error(status: int, message: str) -> web.Response:
    # App Service's error shape; azure-identity reports it (no access_token in it)
    return web.json_response({"statusCode": status, "message": message}, status=status)


async def _token(request: web.Request) -> web.Response:
    ep = request.app[IDENTITY]
    if not hmac.compare_digest(request.headers.get("X-IDENTITY-HEADER", ""), ep.header):
        return _error(401, "Missing or invalid X-IDENTITY-HEADER.")
    query = request.query
    if query.get("api-version") != API_VERSION or not query.get("resource"):
        return _error(400, f"api-version {API_VERSION} and a resource are required.")
    client_id = query.get("client_id") or SYSTEM
    if client_id in ep.refuse:
        return _error(400, "Unable to load the proper Managed Identity.")
    expires_on = int(ep.clock() + ep.lifetime_seconds)
    token = issue(ep.secret, client_id, expires_on, next(ep._serial), query["resource"])
    ep.issued[client_id] += 1
    ep.tokens.append(token)
    return web.json_response({"access_token": token, "expires_on": str(expires_on),
                              "resource": query["resource"], "token_type": "Bearer",
                              "client_id": client_id})


def create_identity_app(endpoint: IdentityEndpoint) -> web.Application:
    app = web.Application()
    app[IDENTITY] = endpoint
    app.router.add_get("/msi/token", _token)
    return app


async def start_identity(endpoint: IdentityEndpoint, host: str = "127.0.0.1", port: int = 0
                         ) -> tuple[web.AppRunner, str]:
    """Serve `endpoint`; returns its runner (call `cleanup()`) and the IDENTITY_ENDPOINT URL."""
    runner = web.AppRunner(create_identity_app(endpoint), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, f"http://{host}:{runner.addresses[0][1]}/msi/token"
