"""HTTP to regions: URLs and auth per kind, the body each region needs, and the
signals a region sends back (throttle wait, remaining tokens).

One pooled `ClientSession` serves every region (keep-alive matters: a TLS
handshake per request would cost more than the whole gateway).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import urlencode

import aiohttp

from balancer.config import Secret, Target
from balancer.operations import Operation
from balancer.validate import ClientRequest

DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
RETRY_AFTER_TEXT = re.compile(rb"[Rr]etry after (\d{1,5}(?:\.\d{1,3})?) seconds?\b")

# Network-level failures worth trying another region for.
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, ConnectionError)


def new_session(connect_timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60,
                                     ttl_dns_cache=300, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout),
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
        raise_for_status=False,
    )


def url(target: Target, op: Operation) -> str:
    """Where a region serves an operation: Azure's dated routes name the deployment in
    the path (`/openai/deployments/{deployment}/chat/completions?api-version=`) except
    for operations without one (`/openai/responses?api-version=`); Azure v1
    (`/openai/v1/{operation}`) and OpenAI (`{endpoint}/{operation}`) never do."""
    return _url(target, op.name, deployment_route=op.deployment_route)


def stored_url(target: Target, path: str, query: Mapping[str, str]) -> str:
    """A stored object's route in its region (`responses/{id}`, `.../cancel`...), with
    the client's query parameters (limit, after, include...) but never its api-version:
    the region's own is what its endpoint accepts."""
    out = _url(target, path, deployment_route=False)
    params = [(k, v) for k, v in query.items() if k != "api-version"]
    if params:
        out += ("&" if "?" in out else "?") + urlencode(params)
    return out


def _url(target: Target, path: str, *, deployment_route: bool) -> str:
    region = target.region
    if region.kind == "openai":
        return f"{region.endpoint}/{path}"
    if region.api_version == "v1":
        return f"{region.endpoint}/openai/v1/{path}"
    if deployment_route:
        return (f"{region.endpoint}/openai/deployments/{target.deployment.deployment}/"
                f"{path}?api-version={region.api_version}")
    return f"{region.endpoint}/openai/{path}?api-version={region.api_version}"


def model_in_body(target: Target, op: Operation) -> bool:
    """Whether the region reads the deployment from the body's `model` (not the path)."""
    return target.region.kind == "openai" or target.region.api_version == "v1" \
        or not op.deployment_route


def headers(target: Target, token: Secret | None = None) -> dict[str, str]:
    """Auth for the region's kind: its key, or for `auth: entra` the Entra `token` the
    caller got (balancer.entra: getting one may wait, this stays pure). Nothing of the
    client's headers is forwarded: a client must not be able to choose the upstream key
    or URL."""
    out = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if token is not None:
        out["Authorization"] = f"Bearer {token.reveal()}"
        return out
    key = target.region.api_key
    if key is not None:
        if target.region.kind == "azure":
            out["api-key"] = key.reveal()
        else:
            out["Authorization"] = f"Bearer {key.reveal()}"
    return out


def body_for(target: Target, req: ClientRequest) -> bytes:
    """The bytes to send: the client's own bytes unless the region needs a change.
    Streams always ask for the final usage chunk, so the reservation settles on real
    usage; where the route does not name the deployment, the model field must."""
    needs_usage = req.stream and req.op.stream is not None and req.op.stream.ask_usage \
        and not req.include_usage
    needs_model = model_in_body(target, req.op) and req.body.get("model") != (
        target.deployment.deployment)
    if not needs_usage and not needs_model:
        return req.raw
    if needs_usage and not needs_model and "stream_options" not in req.body:
        # Splice instead of re-serialising: keeps the client's bytes (and is cheaper).
        head = req.raw.rstrip()
        if head.endswith(b"}"):
            return head[:-1] + b',"stream_options":{"include_usage":true}}'
    body = dict(req.body)
    if needs_usage:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    if needs_model:
        body["model"] = target.deployment.deployment
    return json.dumps(body, separators=(",", ":")).encode()


class Throttle(NamedTuple):
    """How long a 429 asks us to wait, and how finely the header said it: a wait
    rounded up to whole seconds can be up to a second longer than the region needs."""

    seconds: float
    precision: float  # inf: the region said nothing, the wait is our default


def throttle(h: Mapping[str, str], default: float, body: bytes = b"") -> Throttle:
    """How long a 429 asks us to wait: retry-after-ms, else retry-after, else
    x-ratelimit-reset-tokens/-requests, else the wait its error message names (Azure's
    Responses API often sends no header but says "Please retry after 6 seconds."),
    else the configured default."""
    ms = _number(h.get("retry-after-ms"))
    if ms is not None and ms >= 0:
        return Throttle(ms / 1000.0, 0.001)
    seconds = _number(h.get("retry-after"))
    if seconds is not None and seconds >= 0:
        return Throttle(seconds, _resolution(h["retry-after"]))
    resets = [_duration(h.get(name)) for name in
              ("x-ratelimit-reset-tokens", "x-ratelimit-reset-requests")]
    known = [r for r in resets if r is not None and r >= 0]
    if known:
        longest = max(known)
        return Throttle(longest, 1.0 if longest.is_integer() else 0.001)
    said = RETRY_AFTER_TEXT.search(body[:4096])  # error bodies are short; bound the scan
    if said is not None:
        seconds = float(said.group(1))
        return Throttle(seconds, _resolution(said.group(1).decode()))
    return Throttle(default, math.inf)


def _resolution(value: str) -> float:
    """How finely a number of seconds is written, its last digit: "2" to the second (the
    wait was rounded up to it), "0.25" to the hundredth."""
    _, dot, decimals = value.strip().partition(".")
    digits = len(decimals.rstrip()) if dot else 0
    return 10.0 ** -digits if digits else 1.0


def remaining_tokens(h: Mapping[str, str]) -> int | None:
    """`x-ratelimit-remaining-tokens`, or None when missing, malformed or -1 (which
    Azure sends when it does not know)."""
    return _remaining(h, "x-ratelimit-remaining-tokens")


def remaining_requests(h: Mapping[str, str]) -> int | None:
    """`x-ratelimit-remaining-requests`, as `remaining_tokens`."""
    return _remaining(h, "x-ratelimit-remaining-requests")


def utilization(h: Mapping[str, str]) -> float | None:
    """`azure-openai-deployment-utilization` of a provisioned deployment as a ratio 0..1,
    or None when absent or malformed. Azure sends a percentage ("85.3%", as Microsoft's
    azure-openai-benchmark reads it); a bare number is taken as a ratio only within 0..1,
    since "1" or "85" without the sign cannot be told apart."""
    value = h.get("azure-openai-deployment-utilization")
    if value is None:
        return None
    value = value.strip()
    percent = value.endswith("%")
    number = _number(value[:-1] if percent else value)
    if number is None or not math.isfinite(number) or number < 0:
        return None
    if percent:
        number /= 100.0
    elif number > 1:
        return None
    return min(number, 1.0)


def _remaining(h: Mapping[str, str], name: str) -> int | None:
    value = _number(h.get(name))
    if value is None or value < 0:
        return None
    return int(value)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None  # an HTTP-date Retry-After: rare from these services; use the fallbacks


def _duration(value: str | None) -> float | None:
    """`x-ratelimit-reset-*`: a plain number of seconds or a Go-style duration, '6m0s'."""
    if value is None:
        return None
    plain = _number(value)
    if plain is not None:
        return plain
    parts = DURATION.findall(value)
    if not parts:
        return None
    return sum(float(n) * UNIT_SECONDS[u] for n, u in parts)
