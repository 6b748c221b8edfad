"""The gateway: an aiohttp app whose request path reads top to bottom.

    client -> auth -> parse & validate -> estimate cost -> SELECT+RESERVE (store)
           <- relay response <- forward to region <-----------------'
                                 '-> 429/5xx/timeout: cool down or count a failure,
                                     refund, exclude the region, select again
           after the response: SETTLE (reserved vs actual usage) + metrics

Retries happen only before the first byte reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import itertools
import json
import logging
import os
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.aiohttp import make_aiohttp_handler

from balancer import cost, errors, policy, upstream, validate
from balancer.capacity.base import CapacityStore, Grant, Queueing, Wait
from balancer.capacity.memory import MemoryStore
from balancer.config import Config, GatewayConfig, Target
from balancer.errors import ClientError
from balancer.latency import LatencyPools
from balancer.logs import AccessLog
from balancer.metrics import Metrics
from balancer.policy import Limits
from balancer.sse import UsageTap, error_event

log = logging.getLogger("balancer")
access_log = logging.getLogger("balancer.access")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Request ids and queue tickets: 32 hex digits, unique per process by a counter and across
# processes by a random prefix, without uuid4's os.urandom system call per request.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"

JSON_TYPES = ("application/json", "")


# --------------------------------------------------------------------------- routing table


@dataclass(frozen=True)
class ModelRoute:
    """Where one model can go: its targets and their store limits, index-aligned."""

    targets: Mapping[str, Target]
    limits: tuple[Limits, ...]
    default_max_tokens: int


def limits_for(target: Target, config: Config) -> Limits:
    gw, learn, lat = config.gateway, config.learned_capacity, config.latency_weighting
    dep = target.deployment
    per_second_tpm, per_second_rpm = dep.tpm / 60.0, dep.rpm / 60.0
    return Limits(
        region=target.region.name,
        tokens_capacity=per_second_tpm * gw.burst_seconds,
        tokens_rate=per_second_tpm * gw.time_scale,
        requests_capacity=max(1.0, per_second_rpm * gw.rpm_burst_seconds),
        requests_rate=per_second_rpm * gw.time_scale,
        weight=dep.weight,
        priority=target.region.priority,
        min_factor=learn.min_factor if learn.enabled else 1.0,
        recovery_rate=learn.recovery_per_minute / 60.0 * gw.time_scale if learn.enabled else 0.0,
        latency_weight=lat.strength if lat.enabled else 0.0,
    )


def build_routes(config: Config) -> dict[str, ModelRoute]:
    routes = {}
    for model, targets in config.models.items():
        routes[model] = ModelRoute(
            targets={t.region.name: t for t in targets},
            limits=tuple(limits_for(t, config) for t in targets),
            default_max_tokens=max(t.deployment.default_max_tokens for t in targets),
        )
    return routes


@dataclass
class Runtime:
    """Everything a request needs. `config` and `routes` are replaced together on
    reload; a request reads them once, so reloads never change a request midway."""

    config: Config
    store: CapacityStore
    metrics: Metrics
    api_keys: tuple[bytes, ...] = ()
    key_classes: tuple[str | None, ...] = ()  # aligned with api_keys
    session: aiohttp.ClientSession | None = None
    routes: dict[str, ModelRoute] = field(default_factory=dict)
    draining: bool = False
    in_flight: int = 0
    children: dict[tuple[int, tuple[str, ...]], Any] = field(default_factory=dict)
    latency: LatencyPools = field(default_factory=LatencyPools)
    access: AccessLog = field(default_factory=lambda: AccessLog(access_log))

    def __post_init__(self) -> None:
        self.routes = build_routes(self.config)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: prometheus_client's labels() converts,
        validates and locks on every call, several per request. Counters and histograms
        only: gauges' children are cleared on scrape. Labels are bounded (configured
        models and regions, statuses), and so is the cache."""
        key = (id(metric), labels)
        found = self.children.get(key)
        if found is None:
            if len(self.children) > 10_000:
                self.children.clear()
            found = self.children[key] = metric.labels(*labels)
        return found

    def apply(self, config: Config) -> None:
        """Switch to a new config (a reload): both fields at once, no await between."""
        self.routes, self.config = build_routes(config), config


RUNTIME = web.AppKey("runtime", Runtime)


@dataclass
class Record:
    """One structured access-log line per request (no secrets, no bodies)."""

    request_id: str
    model: str | None = None
    region: str | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


RECORD = web.RequestKey("record", Record)  # the request's access-log record


# --------------------------------------------------------------------------- request path


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await proxy(request, "chat/completions", None)


async def completions(request: web.Request) -> web.StreamResponse:
    return await proxy(request, "completions", None)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await proxy(request, "embeddings", None)


async def azure(request: web.Request) -> web.StreamResponse:
    api_version = request.query.get("api-version")
    if not api_version:
        raise ClientError(400, "Missing the api-version query parameter.", "missing_api_version",
                          param="api-version")
    # [0-9], not \d: \d also matches non-ASCII digits (fullwidth, Arabic-Indic...).
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?", api_version):
        raise ClientError(400, "Unsupported api-version: use the form YYYY-MM-DD[-preview].",
                          "invalid_api_version", param="api-version")
    return await proxy(request, request.match_info["operation"], request.match_info["model"])


async def proxy(request: web.Request, operation: str, path_model: str | None
                ) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    record: Record = request[RECORD]
    key_class = authorize(request, rt)
    raw = await read_body(request, rt.config.gateway.max_body_bytes,
                          rt.config.gateway.body_timeout_seconds)
    req = validate.parse(operation, raw, path_model)
    config, routes = rt.config, rt.routes  # this request keeps them, whatever a reload does
    route = routes.get(req.model)
    if route is None:
        raise ClientError(404, f"The model '{req.model[:256]}' does not exist or you do not "
                          "have access to it.", "model_not_found", param="model",
                          reason="not_found")
    # Only a configured model names a metric series or an access-log line: a client
    # sending made-up names must not grow /metrics (or the logs) without bound.
    record.model = req.model
    estimate = cost.estimate(operation, req.body, route.default_max_tokens)
    call = Call(rt, request, req, estimate, config, record,
                priority=priority_of(request, config, key_class))

    gw = call.gw
    loop = asyncio.get_running_loop()
    deadline = loop.time() + gw.deadline_seconds
    avoid: set[str] = set()  # regions that failed this request (a 429 cools down instead)
    failure: Failure | None = None
    for attempt in range(1, gw.max_attempts + 1):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        grant = await admit(call, route, avoid)  # may wait in the admission queue
        if isinstance(grant, Wait):
            if failure is None:
                rt.metrics.rejections.labels("no_capacity").inc()
                return errors.no_capacity(req.model, grant.retry_after)
            break
        if failure is not None:
            rt.metrics.retries.labels(req.model, failure.reason).inc()
        record.attempts, record.region = attempt, grant.region
        rt.child(rt.metrics.selections, req.model, grant.region).inc()
        outcome = await forward(call, grant, route.targets[grant.region], remaining)
        if isinstance(outcome, web.StreamResponse):
            return outcome
        failure = outcome
        if failure.reason != "throttled":
            avoid.add(grant.region)
    if failure is None:  # the deadline passed before any attempt
        return errors.no_capacity(req.model, gw.default_cooldown_seconds)
    return failure.response()


MIN_QUEUE_SLEEP = 0.01  # a waiter never asks the store more often than this


async def admit(call: Call, route: ModelRoute, avoid: set[str]) -> Grant | Wait:
    """Reserve capacity for one attempt. With the admission queue on, a request that
    cannot be served now waits, in order within its priority class, until capacity
    returns or its wait budget (kept across its attempts) runs out. Sleeps come from
    the store's refill arithmetic: no spinning."""
    rt, aq, model = call.rt, call.config.admission_queue, call.req.model
    cost = call.estimate.total
    if not aq.enabled:
        return await rt.store.acquire(model, route.limits, cost, random.random(), avoid)
    loop = asyncio.get_running_loop()
    started = loop.time()
    if call.wait_until is None:
        call.wait_until = started + wait_budget(call)
        call.first_admit = started
    # The head start counts the time already spent here, so a request sent back to the
    # queue by a region's 429 takes the place it had, not the tail.
    boost = call.priority * aq.class_head_start_seconds + (started - call.first_admit)
    queue = Queueing(call.ticket, boost, max(0.0, call.wait_until - started))
    queued = False
    result: Grant | Wait | None = None
    try:
        while True:
            result = await rt.store.acquire(model, route.limits, cost, random.random(), avoid,
                                            queue=queue)
            if isinstance(result, Grant) or not result.queued:
                return result
            queued = True
            if loop.time() + result.retry_after > call.wait_until:
                return result  # its turn cannot come in time: answer now
            depth = rt.metrics.queue_depth.labels(model)
            depth.inc()
            try:
                await asyncio.sleep(max(result.retry_after, MIN_QUEUE_SLEEP))
            finally:
                depth.dec()
            queue = replace(queue, budget=max(0.0, call.wait_until - loop.time()))
    finally:
        if queued:
            admitted = isinstance(result, Grant)
            rt.metrics.admission_wait.labels(model, "admitted" if admitted else "rejected"
                                             ).observe(loop.time() - started)
            if not admitted:  # leaving (deadline, or the client went away): free the place
                await asyncio.shield(rt.store.dequeue(model, queue.ticket))


def wait_budget(call: Call) -> float:
    """Seconds this request may wait: `x-balancer-max-wait-ms`, else the route's
    default, capped by `admission_queue.max_wait_ms`."""
    aq = call.config.admission_queue
    raw = call.request.headers.get("x-balancer-max-wait-ms")
    if raw is None:
        ms = aq.default_wait_ms.get(call.req.operation, 0)
    else:
        try:
            ms = int(raw)
        except ValueError:
            ms = -1
        if ms < 0:
            raise ClientError(400, "x-balancer-max-wait-ms must be a whole number of "
                              "milliseconds >= 0.", "invalid_max_wait")
    return min(ms, aq.max_wait_ms) / 1000.0


def priority_of(request: web.Request, config: Config, key_class: str | None) -> int:
    """The rank of the request's priority class: the `x-balancer-priority` header when
    the config allows it, else the client key's class, else the default class."""
    aq = config.admission_queue
    name = key_class or aq.default_class
    asked = request.headers.get("x-balancer-priority")
    if asked is not None and aq.priority_header:
        if asked not in aq.classes:
            raise ClientError(400, f"x-balancer-priority must be one of "
                              f"{', '.join(aq.classes)}.", "invalid_priority")
        name = asked
    return aq.classes.get(name, aq.classes.get(aq.default_class, 0))


@dataclass(slots=True)
class Call:
    """One client request on its way: what every step of its path needs. `config` is
    the config as it was when the request arrived, so a reload never changes it midway."""

    rt: Runtime
    request: web.Request
    req: validate.ClientRequest
    estimate: cost.Estimate
    config: Config
    record: Record
    priority: int = 0  # rank of its class in the admission queue: higher goes first
    ticket: str = field(default_factory=new_id)  # its place in the queue
    wait_until: float | None = None  # loop time its wait budget ends (set on first admit)
    first_admit: float = 0.0  # loop time of its first admission attempt

    @property
    def gw(self) -> GatewayConfig:
        return self.config.gateway


@dataclass
class Failure:
    """An attempt that may be retried elsewhere; if it is the last, the client gets it."""

    reason: str  # label: throttled, status_5xx, timeout, connect, bad_response
    region: str
    status: int
    body: bytes
    retry_after: float | None = None

    def response(self) -> web.Response:
        headers = {"x-balancer-region": self.region}
        if self.retry_after is not None:
            headers["Retry-After"] = errors.retry_after_header(self.retry_after)
        if _is_openai_error(self.body):  # relay the region's own error as it was
            return web.Response(status=self.status, body=self.body, headers=headers,
                                content_type="application/json")
        return errors.response(self.status, f"The upstream region failed ({self.reason}).",
                               self.reason, type_="upstream_error", headers=headers)


async def forward(call: Call, grant: Grant, target: Target, remaining: float
                  ) -> web.StreamResponse | Failure:
    """One attempt at one region: a final response, or a Failure to retry elsewhere."""
    gw, m, store, req = call.gw, call.rt.metrics, call.rt.store, call.req
    model, region = req.model, grant.region
    timeout = aiohttp.ClientTimeout(total=None, connect=min(gw.connect_timeout_seconds, remaining),
                                    sock_read=min(gw.read_timeout_seconds, remaining))
    session = call.rt.session
    assert session is not None
    sent = time.perf_counter()
    try:
        up = await session.post(upstream.url(target, req.operation),
                                data=upstream.body_for(target, req),
                                headers=upstream.headers(target), timeout=timeout)
    except TRANSPORT_ERRORS as exc:
        reason = "timeout" if isinstance(exc, TimeoutError) else "connect"
        # A timed-out request may still be running upstream: keep its reservation.
        await region_failed(call, grant, reason, refund=reason == "connect")
        return Failure(reason, region, 504 if reason == "timeout" else 502, b"")
    call.rt.child(m.upstream_latency, model, region).observe(time.perf_counter() - sent)

    async with up:
        status = up.status
        if status == 429:
            throttle = upstream.throttle(up.headers, gw.default_cooldown_seconds)
            body = await _read_quietly(up)
            m.upstream_throttled.labels(model, region).inc()
            await store.settle(grant, 0)
            await store.cooldown(model, grant.limits, throttle.seconds,
                                 share=implied_share(call, grant, throttle, up.headers))
            return Failure("throttled", region, 429, body, retry_after=throttle.seconds)
        if status >= 500 or status in (401, 403, 404, 408):
            # 401/403/404 mean this region is misconfigured, not that the request is bad.
            body = await _read_quietly(up)
            await region_failed(call, grant, f"status_{status // 100}xx", refund=True)
            return Failure(f"status_{status // 100}xx", region, status, body)
        if status >= 400:  # the request itself is wrong: the same answer everywhere
            body = await _read_quietly(up)
            await store.settle(grant, 0)
            await region_ok(call, grant)
            return _relay(status, body, up, region)
        if req.stream and up.content_type == "text/event-stream":
            return await relay_stream(call, grant, up, sent)
        try:
            body = await up.read()
            usage = upstream.usage_of(json.loads(body))
        except (*TRANSPORT_ERRORS, ValueError):
            usage = None
        if usage is None:  # 200 with a body we cannot read: the region is broken
            await region_failed(call, grant, "bad_response", refund=False)
            return Failure("bad_response", region, 502, b"")
        await learn_remaining(call, grant, up)
        await settle(call, grant, usage, time.perf_counter() - sent)
        await region_ok(call, grant)
        return _relay(status, body, up, region)


async def relay_stream(call: Call, grant: Grant, up: aiohttp.ClientResponse, sent: float
                       ) -> web.StreamResponse | Failure:
    """Relay SSE chunk by chunk. Until the first chunk arrives nothing has reached the
    client, so a region that fails before it can still be retried elsewhere."""
    region, req = grant.region, call.req
    tap = UsageTap(strip_usage_chunk=not req.include_usage)
    try:
        first = await up.content.readany()
    except TRANSPORT_ERRORS:
        first = b""
    if not first:
        await region_failed(call, grant, "bad_response", refund=False)
        return Failure("bad_response", region, 502, b"")
    call.rt.metrics.time_to_first_token.labels(req.model, region).observe(
        time.perf_counter() - sent)

    response = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "x-balancer-region": region})
    await response.prepare(call.request)
    broken: str | None = None
    client_gone = False
    chunks = _chunks(up, first)
    while True:
        try:
            chunk = await anext(chunks, None)
        except TRANSPORT_ERRORS as exc:
            broken = "timeout" if isinstance(exc, TimeoutError) else "stream_broken"
            break
        out = tap.feed(chunk) if chunk is not None else tap.flush()
        if out:
            try:
                await response.write(out)
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                client_gone = True
                break
        if chunk is None:
            break
    if not broken and not client_gone and not tap.done:
        broken = "stream_broken"  # the region closed without `data: [DONE]`
    if broken:
        log.warning("stream from %s broke after the first byte: %s", region, broken)
        await region_failed(call, grant, broken, refund=False)
        if not client_gone:
            try:
                await response.write(error_event(
                    "The upstream region broke the stream; the answer is incomplete.", broken))
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                client_gone = True
    if tap.usage is not None:
        await learn_remaining(call, grant, up)
        await settle(call, grant, tap.usage, time.perf_counter() - sent)
    if not broken:
        await region_ok(call, grant)
    if not client_gone:
        await response.write_eof()
    call.rt.child(call.rt.metrics.requests, req.model, region, "200").inc()
    return response


async def _chunks(up: aiohttp.ClientResponse, first: bytes) -> AsyncIterator[bytes]:
    yield first
    async for chunk in up.content.iter_any():
        yield chunk


async def settle(call: Call, grant: Grant, usage: tuple[int, int], elapsed: float) -> None:
    """Reconcile the reservation with real usage. In `quota` mode, charge what Azure's
    quota counter charges: the real prompt plus the completion budget it reserved; in
    `usage` mode, the tokens really used. With latency weighting on, the same call
    carries this replica's pooled seconds per output token when one is due
    (balancer.latency), so an exact estimate still costs no store call."""
    prompt, completion = usage
    if call.gw.settle == "usage":
        charged = prompt + completion
    else:
        charged = prompt + max(call.estimate.completion, completion)
    latency = None
    if call.config.latency_weighting.enabled and completion > 0:
        latency = call.rt.latency.add(grant.model, grant.region, elapsed, completion,
                                      riding=charged != grant.tokens)
    if charged != grant.tokens or latency is not None:  # else settling is a no-op
        await call.rt.store.settle(grant, charged, latency)
    call.record.prompt_tokens, call.record.completion_tokens = usage
    m = call.rt.metrics
    call.rt.child(m.tokens, grant.model, grant.region, "prompt").inc(prompt)
    call.rt.child(m.tokens, grant.model, grant.region, "completion").inc(completion)


def implied_share(call: Call, grant: Grant, throttle: upstream.Throttle,
                  headers: Mapping[str, str]) -> float | None:
    """What this 429 says of the region's real refill (policy.implied_share); nothing
    with learning off."""
    if not call.config.learned_capacity.enabled:
        return None
    return policy.implied_share(grant.limits, grant.tokens, throttle.seconds,
                                throttle.precision, upstream.remaining_tokens(headers),
                                upstream.remaining_requests(headers))


async def learn_remaining(call: Call, grant: Grant, up: aiohttp.ClientResponse) -> None:
    """A region reporting fewer remaining tokens than our bucket held right after the
    reservation is serving someone we cannot see: bring the bucket down to its word.
    Missing or -1 headers say nothing. Costs a store call only on such a discrepancy."""
    learn = call.config.learned_capacity
    if not learn.enabled:
        return
    remaining = upstream.remaining_tokens(up.headers)
    if remaining is None:
        return
    # The slack covers requests reserved here but admitted there in another order.
    slack = learn.evidence_margin * grant.limits.tokens_capacity + grant.tokens
    if remaining < grant.level - slack:
        await call.rt.store.observe(grant.model, grant.limits, float(remaining))


async def region_failed(call: Call, grant: Grant, reason: str, *, refund: bool) -> None:
    gw, store = call.gw, call.rt.store
    call.rt.metrics.upstream_errors.labels(grant.model, grant.region, reason).inc()
    if refund:
        await store.settle(grant, 0)
    opened = await store.record_failure(grant.model, grant.limits, gw.circuit_failures,
                                        gw.circuit_open_seconds)
    if opened:
        log.warning("circuit open for %s/%s for %.0f s after %s", grant.model, grant.region,
                    gw.circuit_open_seconds, reason)


async def region_ok(call: Call, grant: Grant) -> None:
    if grant.failures:  # only then is there a failure count to clear
        await call.rt.store.record_success(grant.model, grant.limits)


def _relay(status: int, body: bytes, up: aiohttp.ClientResponse, region: str) -> web.Response:
    return web.Response(status=status, body=body, headers={
        "Content-Type": up.headers.get("Content-Type", "application/json"),
        "x-balancer-region": region})


async def _read_quietly(up: aiohttp.ClientResponse) -> bytes:
    try:
        return await up.read()
    except TRANSPORT_ERRORS:
        return b""


def _is_openai_error(body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and isinstance(payload.get("error"), dict)


TRANSPORT_ERRORS = upstream.TRANSPORT_ERRORS


# --------------------------------------------------------------------------- client side


def authorize(request: web.Request, rt: Runtime) -> str | None:
    """With client keys configured, every API route needs one (Bearer or api-key),
    compared in constant time against every key so timing reveals nothing. Returns the
    priority class configured for the key (`KEY#class` in BALANCER_API_KEYS), if any."""
    if not rt.api_keys:
        return None
    given = request.headers.get("api-key", "")
    auth = request.headers.get("Authorization", "")
    if not given and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    # Fixed-length digests: compare_digest's time then depends on neither the keys'
    # contents nor their lengths. surrogateescape gives back the bytes as sent, so a
    # header that is not UTF-8 is merely a wrong key (strict encoding raised: a 500).
    candidate = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    ok = False
    key_class = None
    for key, cls in zip(_digests(rt.api_keys), rt.key_classes or (None,) * len(rt.api_keys),
                        strict=True):
        same = hmac.compare_digest(candidate, key)
        ok |= same
        key_class = cls if same else key_class
    if not ok:
        raise ClientError(401, "Incorrect API key provided." if given else
                          "You didn't provide an API key. Use 'Authorization: Bearer KEY' or "
                          "an 'api-key' header.", "invalid_api_key", reason="auth")
    return key_class


@functools.lru_cache(maxsize=8)
def _digests(keys: tuple[bytes, ...]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(k).digest() for k in keys)


async def read_body(request: web.Request, limit: int, seconds: float) -> bytes:
    """The body, refused with 413 past `limit` bytes (read in chunks, so a reload can
    change the limit and an oversized body is never held whole), and with 408 when it
    takes longer than `seconds`: a client trickling its body (slowloris) must
    not hold a handler and a connection forever."""
    # No Content-Type at all is taken as JSON; aiohttp reports both that and an
    # unparseable one ("json") as application/octet-stream, so look at the header.
    ctype = request.content_type if "Content-Type" in request.headers else ""
    if ctype not in JSON_TYPES and not ctype.endswith("+json"):
        raise ClientError(415, f"Unsupported Content-Type {ctype!r}: send application/json.",
                          "unsupported_media_type")
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    if request.content_length is not None and request.content.is_eof():
        return await request.read()  # all there already (most bodies): nothing to wait for
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.content.iter_chunked(65536):
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                parts.append(chunk)
    except TimeoutError:
        raise ClientError(408, f"The request body did not arrive within {seconds:g} s.",
                          "request_timeout", reason="timeout") from None
    except (ConnectionError, HttpProcessingError):
        # The client left mid-body, or its chunked framing is broken: its fault, not ours.
        raise ClientError(400, "The request body was cut short or badly framed.",
                          "invalid_body") from None
    return b"".join(parts)


def _too_large(limit: int) -> ClientError:
    return ClientError(413, f"The request body is larger than {limit} bytes.",
                       "request_too_large", reason="too_large")


# --------------------------------------------------------------------------- other routes


async def list_models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    authorize(request, rt)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "balancer"}
            for name in sorted(rt.routes)]
    return web.json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    body = {"status": "draining" if rt.draining else "ready", "store": rt.store.name,
            "degraded": bool(getattr(rt.store, "degraded", False))}
    return web.json_response(body, status=503 if rt.draining else 200)


async def regions(request: web.Request) -> web.Response:
    """Per model and region: remaining tokens, cooldown and circuit. No endpoints, no keys."""
    rt = request.app[RUNTIME]
    authorize(request, rt)
    if not rt.config.gateway.expose_regions:
        raise web.HTTPNotFound()
    models = {}
    for model, route in sorted(rt.routes.items()):
        states = await rt.store.snapshot(model, route.limits)
        rows = []
        for lim, state in zip(route.limits, states, strict=True):
            target = route.targets[lim.region]
            rows.append({
                "region": lim.region, "kind": target.region.kind, "priority": lim.priority,
                "deployment": target.deployment.deployment, "tpm": target.deployment.tpm,
                "rpm": target.deployment.rpm, "weight": lim.weight,
                "tokens_remaining": round(state.tokens, 1),
                "tokens_capacity": round(state.tokens_capacity, 1),
                "requests_remaining": round(state.requests, 2),
                "cooldown_seconds": round(state.cooldown_seconds, 3),
                "circuit": state.circuit, "failures": state.failures,
                "capacity_factor": round(state.factor, 4),
                "latency_seconds_per_token": round(state.latency, 6)})
        models[model] = rows
    return web.json_response({
        "store": rt.store.name, "degraded": bool(getattr(rt.store, "degraded", False)),
        "replicas": int(getattr(rt.store, "replicas", 1)), "models": models})


async def metrics_handler(request: web.Request) -> web.Response:
    """Refresh the gauges read from the store, then render the registry."""
    rt = request.app[RUNTIME]
    m, routes = rt.metrics, rt.routes  # a reload during the awaits must not mix configs
    snapshots = {model: await rt.store.snapshot(model, route.limits)
                 for model, route in routes.items()}
    region_gauges = (m.region_tpm, m.remaining_tokens, m.remaining_requests, m.capacity_tokens,
                     m.cooldown, m.circuit_open, m.capacity_factor, m.latency_per_token)
    for gauge in region_gauges:  # a region removed by a reload must not linger
        gauge.clear()
    for model, states in snapshots.items():
        route = routes[model]
        for state in states:
            m.region_tpm.labels(model, state.region).set(
                route.targets[state.region].deployment.tpm)
            m.remaining_tokens.labels(model, state.region).set(state.tokens)
            m.remaining_requests.labels(model, state.region).set(state.requests)
            m.capacity_tokens.labels(model, state.region).set(state.tokens_capacity)
            m.cooldown.labels(model, state.region).set(state.cooldown_seconds)
            m.circuit_open.labels(model, state.region).set(1 if state.circuit == "open" else 0)
            m.capacity_factor.labels(model, state.region).set(state.factor)
            m.latency_per_token.labels(model, state.region).set(state.latency)
    m.store_degraded.set(1 if getattr(rt.store, "degraded", False) else 0)
    m.live_replicas.set(int(getattr(rt.store, "replicas", 1)))
    return await request.app[METRICS_RENDER](request)


METRICS_RENDER = web.AppKey("metrics_render", object)


# --------------------------------------------------------------------------- middleware


@web.middleware
async def openai_errors(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """Every failure becomes an OpenAI-shaped JSON error; one access-log line per
    API request; `x-request-id` is honoured or generated and always returned."""
    incoming = request.headers.get("x-request-id", "")
    request_id = incoming if REQUEST_ID.match(incoming) else new_id()
    record = Record(request_id)
    request[RECORD] = record
    rt = request.app[RUNTIME]
    started = time.perf_counter()
    rt.in_flight += 1
    rt.metrics.in_flight.inc()
    try:
        response = await handler(request)
    except ClientError as exc:
        rt.metrics.rejections.labels(exc.reason).inc()
        response = errors.from_client_error(exc)
        if exc.status == 408:  # close at once rather than linger reading a trickled body
            response.force_close()
    except web.HTTPException as exc:
        response = _http_exception(exc)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        response = errors.response(500, "The gateway failed to handle the request.",
                                   "internal_error", type_="server_error")
    finally:
        rt.in_flight -= 1
        rt.metrics.in_flight.dec()
    if record.model is not None:
        if not response.prepared:  # streams count themselves once relayed
            rt.child(rt.metrics.requests, record.model, record.region or "none",
                     str(response.status)).inc()
        rt.access.write({
            "request_id": request_id, "method": request.method, "path": request.path,
            "model": record.model, "region": record.region, "attempts": record.attempts,
            "status": response.status,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens})
    return response


def _http_exception(exc: web.HTTPException) -> web.Response:
    codes = {404: ("not_found", "Unknown route."), 405: ("method_not_allowed",
             "Method not allowed."), 413: ("request_too_large", "The request body is too large.")}
    code, message = codes.get(exc.status, ("http_error", exc.reason))
    if exc.status == 404 and exc.text and "Not Found" not in exc.text:
        message = exc.text
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return errors.response(exc.status, message, code, headers=headers)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    record = request.get(RECORD)
    if record is not None:
        response.headers["x-request-id"] = record.request_id


# --------------------------------------------------------------------------- app


def open_store(config: Config, metrics: Metrics) -> CapacityStore:
    if config.store.url.startswith("memory"):
        return MemoryStore()
    from balancer.capacity.factory import create_store

    return create_store(
        config.store,
        on_round_trip=lambda op: metrics.store_round_trips.labels(op).inc(),
        on_degraded=lambda flag: metrics.store_degraded.set(1 if flag else 0),
    )


def client_keys(env: Mapping[str, str] = os.environ
                ) -> tuple[tuple[bytes, ...], tuple[str | None, ...]]:
    """BALANCER_API_KEYS: comma-separated keys, each optionally `KEY#class` to give its
    requests a priority class of the admission queue."""
    keys, classes = [], []
    for entry in env.get("BALANCER_API_KEYS", "").split(","):
        key, _, cls = entry.strip().partition("#")
        if key:
            keys.append(key.encode())
            classes.append(cls or None)
    return tuple(keys), tuple(classes)


def create_app(config: Config, *, store: CapacityStore | None = None,
               api_keys: tuple[bytes, ...] | None = None) -> web.Application:
    metrics = Metrics()
    keys, classes = client_keys() if api_keys is None else (api_keys, ())
    rt = Runtime(config=config, store=store or open_store(config, metrics), metrics=metrics,
                 api_keys=keys, key_classes=classes)
    app = web.Application(middlewares=[openai_errors])
    app[RUNTIME] = rt
    app[METRICS_RENDER] = make_aiohttp_handler(metrics.registry)
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_store_lifecycle)
    app.cleanup_ctx.append(_loop_lag_probe)
    app.cleanup_ctx.append(_access_log_writer)
    app.on_response_prepare.append(add_request_id)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post(
        r"/openai/deployments/{model}/{operation:chat/completions|completions|embeddings}",
        azure)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/regions", regions)
    app.router.add_get("/metrics", metrics_handler)
    return app


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    rt.session = upstream.new_session(rt.config.gateway.connect_timeout_seconds)
    yield
    await rt.session.close()


async def _store_lifecycle(app: web.Application) -> AsyncIterator[None]:
    store = app[RUNTIME].store
    start = getattr(store, "start", None)
    if start is not None:
        await start()
    yield
    await store.close()


async def _access_log_writer(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[RUNTIME].access.run(), name="balancer-access-log")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _loop_lag_probe(app: web.Application) -> AsyncIterator[None]:
    """`balancer_event_loop_lag_seconds`: how late a 0.1 s timer fired, worst over each
    second. Anything that blocks the loop (CPU-bound work, a blocking call) delays every
    request by as much, and shows here first."""
    gauge = app[RUNTIME].metrics.event_loop_lag

    async def probe() -> None:  # perf_counter: uvloop's loop.time() counts whole ms
        worst, window_end = 0.0, time.perf_counter() + 1.0
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.1)
            now = time.perf_counter()
            worst = max(worst, now - before - 0.1)
            if now >= window_end:
                gauge.set(worst)
                worst, window_end = 0.0, now + 1.0

    task = asyncio.create_task(probe(), name="balancer-loop-lag")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
