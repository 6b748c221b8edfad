"""Azure-like simulated regions: real HTTP upstreams with TPM/RPM limits, 429s and SSE.

One aiohttp app serves many regions, each under a path prefix (`http://HOST:PORT/eastus2`),
in both wire shapes:

- Azure:  POST /{region}/openai/deployments/{deployment}/{op}?api-version=...  (`api-key` header)
- OpenAI: POST /{region}/v1/{op}, the deployment named by body["model"]  (`Authorization: Bearer`)

with op one of chat/completions, completions, embeddings. Admission copies Azure: the
*estimated* cost (`cost.prompt_tokens` + `cost.completion_budget`, the gateway's own estimate)
is charged to a token bucket holding `token_window_seconds` of the TPM quota, beside a request
bucket for RPM, and nothing is refunded after the answer. A refused request gets 429 with
`retry-after` / `retry-after-ms` in real seconds.

Fault knobs live on `SimRegion` and change at run time with POST /_sim/regions/{region};
GET /_sim/stats and POST /_sim/reset serve tests and benchmarks.

Choices the brief left open:
- a missing api-version answers 404 "Resource not found", as Azure does;
- `fail_rate` is drawn before admission and charges nothing (the backend refused the call);
  `hang`, `malformed` and `reset_after_chunks` strike after admission, so they are charged;
  all four count in the `failed` stat;
- a stream with `reset_after_chunks` set never completes: it is cut after N chunks, or just
  before `data: [DONE]` when it is shorter; the knob does not affect non-stream answers;
- `prompt + completion budget` above CONTEXT_TOKENS is refused with 400, which also bounds the
  size of the text we generate;
- `create_app` deep-copies the regions, so apps built from one config never share knobs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import json
import math
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from aiohttp import web

from balancer import cost

Clock = Callable[[], float]

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
CONTEXT_TOKENS = 131_072  # largest prompt + completion budget a request may ask for
STREAM_CHUNK_TOKENS = 4  # completion tokens per SSE content delta
EMBEDDING_DIMS = 8
WORD = "lorem "  # one completion token
HANG_POLL_SECONDS = 0.2  # how often a hung request checks whether its client left
_OPERATIONS = "|".join(cost.OPERATIONS)
_AZURE_OPERATION = {
    "chat/completions": "ChatCompletions_Create",
    "completions": "Completions_Create",
    "embeddings": "Embeddings_Create",
}
_REQUIRED_FIELD = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input"}


@dataclass
class SimDeployment:
    name: str
    tpm: int
    rpm: int | None = None  # default: 6 per 1,000 TPM, as Azure assigns

    def __post_init__(self) -> None:
        if self.rpm is None:
            self.rpm = max(1, self.tpm * 6 // 1000)


@dataclass
class SimRegion:
    name: str
    deployments: list[SimDeployment]
    api_key: str | None = None  # None: any non-empty key is accepted
    latency_base_ms: float = 20.0
    latency_per_token_ms: float = 0.5
    fail_rate: float = 0.0
    fail_status: int = 500
    hang: bool = False
    reset_after_chunks: int | None = None
    malformed: str | None = None  # "json" | "html"
    throttle_headers: str = "normal"  # "normal" | "none" | "minus1"
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


# --- run-time knobs -------------------------------------------------------------------------


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _non_negative(v: Any) -> bool:
    return _number(v) and v >= 0


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_KNOBS: dict[str, Callable[[Any], bool]] = {
    "api_key": lambda v: v is None or (isinstance(v, str) and v != ""),
    "latency_base_ms": _non_negative,
    "latency_per_token_ms": _non_negative,
    "fail_rate": lambda v: _number(v) and 0 <= v <= 1,
    "fail_status": lambda v: _integer(v) and 400 <= v <= 599,
    "hang": lambda v: isinstance(v, bool),
    "reset_after_chunks": lambda v: v is None or (_integer(v) and v >= 0),
    "malformed": lambda v: v in (None, "json", "html"),
    "throttle_headers": lambda v: v in ("normal", "none", "minus1"),
    "slowdown": _non_negative,
    "cotenant_tpm": _non_negative,
}
_FLOAT_KNOBS = {"latency_base_ms", "latency_per_token_ms", "fail_rate", "slowdown", "cotenant_tpm"}


def region_knobs(region: SimRegion) -> dict[str, Any]:
    """The region's run-time knobs, as the control endpoint reports them (the key withheld)."""
    return {k: getattr(region, k) for k in _KNOBS if k != "api_key"}


# --- admission ------------------------------------------------------------------------------


@dataclass
class _Bucket:
    capacity: float
    rate: float  # refill per real second
    level: float
    updated: float
    drain: float = 0.0  # hidden co-tenant's consumption per real second

    def advance(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.updated = max(self.updated, now)
        net = self.rate - self.drain
        level = min(self.capacity, self.level + net * elapsed)
        if net < 0:  # the co-tenant is throttled too: it cannot push the bucket below zero
            level = max(level, min(self.level, 0.0))
        self.level = level

    def wait_for(self, amount: float) -> float:
        """Real seconds until the bucket holds `amount` (inf if it never will)."""
        missing = amount - self.level
        if missing <= 0:
            return 0.0
        net = self.rate - self.drain
        return missing / net if net > 0 else math.inf


@dataclass
class _Stats:
    requests: int = 0
    admitted: int = 0
    throttled: int = 0
    failed: int = 0
    admitted_tokens: int = 0  # estimated cost charged, as Azure's quota counter sees it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    peak_window_tokens: int = 0  # most estimated tokens admitted within one simulated minute
    # what clients sent, admitted or not: shows a gateway overshooting a region's quota
    offered_tokens: int = 0
    peak_window_offered_tokens: int = 0


class _Window:
    """Tokens within a sliding window of `seconds` (one simulated minute)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.entries: deque[tuple[float, int]] = deque()
        self.total = 0

    def clear(self) -> None:
        self.entries.clear()
        self.total = 0

    def add(self, tokens: int, now: float) -> int:
        """Record `tokens` at `now`; returns the window's total."""
        self.entries.append((now, tokens))
        self.total += tokens
        while self.entries and self.entries[0][0] <= now - self.seconds:
            self.total -= self.entries.popleft()[1]
        return self.total


class _Deployment:
    """Buckets, stats and the sliding window of one (region, deployment)."""

    def __init__(self, spec: SimDeployment, config: SimConfig, now: float) -> None:
        assert spec.rpm is not None
        self.spec = spec
        tokens_per_s, requests_per_s = spec.tpm / 60, spec.rpm / 60
        self.tokens = _Bucket(
            tokens_per_s * config.token_window_seconds, tokens_per_s * config.time_scale, 0, now
        )
        self.requests = _Bucket(
            max(1.0, requests_per_s * config.request_window_seconds),
            requests_per_s * config.time_scale,
            0,
            now,
        )
        self.window_seconds = 60 / config.time_scale
        self.window = _Window(self.window_seconds)
        self.offered = _Window(self.window_seconds)
        self.stats = _Stats()
        self.reset(now)

    def reset(self, now: float) -> None:
        for bucket in (self.tokens, self.requests):
            bucket.level, bucket.updated = bucket.capacity, now
        self.window.clear()
        self.offered.clear()
        self.stats = _Stats()

    def admit(self, charge: int, now: float) -> float:
        """Charge the request and return 0, or return the real seconds until it would fit."""
        self.tokens.advance(now)
        self.requests.advance(now)
        self.stats.offered_tokens += charge
        self.stats.peak_window_offered_tokens = max(
            self.stats.peak_window_offered_tokens, self.offered.add(charge, now)
        )
        need = min(charge, self.tokens.capacity)  # a request bigger than the bucket needs it full
        if self.tokens.level + 1e-9 >= need and self.requests.level + 1e-9 >= 1:
            self.tokens.level -= charge  # may go negative: the overdraft delays later requests
            self.requests.level -= 1
            self._record(charge, now)
            return 0.0
        return max(self.tokens.wait_for(need), self.requests.wait_for(1), 1e-3)

    def _record(self, charge: int, now: float) -> None:
        self.stats.admitted += 1
        self.stats.admitted_tokens += charge
        self.stats.peak_window_tokens = max(
            self.stats.peak_window_tokens, self.window.add(charge, now)
        )

    def snapshot(self, now: float) -> dict[str, Any]:
        self.tokens.advance(now)
        self.requests.advance(now)
        return {
            **asdict(self.stats),
            "tpm": self.spec.tpm,
            "rpm": self.spec.rpm,
            "tokens_available": self.tokens.level,
            "requests_available": self.requests.level,
            # what the buckets can let through in one simulated minute: a full burst + the refill
            "max_tokens_over_window": self.spec.tpm + self.tokens.capacity,
        }


class Simulator:
    """The whole state of one simulator app, kept under `SIMULATOR` in the app."""

    def __init__(self, config: SimConfig, clock: Clock = time.monotonic) -> None:
        _validate(config)
        self.config = config
        self.clock = clock
        self.rng = random.Random(config.seed)
        self.regions = {r.name: r for r in copy.deepcopy(config.regions)}
        now = clock()
        self.deployments = {
            (r.name, d.name): _Deployment(d, config, now)
            for r in self.regions.values()
            for d in r.deployments
        }
        self.closing = asyncio.Event()  # set at shutdown: releases hung requests
        for region in self.regions.values():
            self._set_cotenant(region, now)

    def region(self, name: str) -> SimRegion:
        region = self.regions.get(name)
        if region is None:
            raise _ApiError(404, f"Resource not found: no region {name!r}", "404")
        return region

    def deployment(self, region: SimRegion, name: str) -> _Deployment:
        dep = self.deployments.get((region.name, name))
        if dep is None:
            message = f"The API deployment {name!r} does not exist in region {region.name!r}."
            raise _ApiError(404, message, "DeploymentNotFound")
        return dep

    def set_knobs(self, region: SimRegion, knobs: dict[str, Any]) -> None:
        for key, value in knobs.items():
            setattr(region, key, float(value) if key in _FLOAT_KNOBS else value)
        self._set_cotenant(region, self.clock())

    def _set_cotenant(self, region: SimRegion, now: float) -> None:
        for dep in self._deployments_of(region):
            dep.tokens.advance(now)  # settle the time so far at the old drain rate
            dep.tokens.drain = region.cotenant_tpm / 60 * self.config.time_scale

    def _deployments_of(self, region: SimRegion) -> list[_Deployment]:
        return [self.deployments[(region.name, d.name)] for d in region.deployments]

    def completion_length(self, budget: int) -> int:
        low, high = self.config.completion_fraction
        return max(1, round(self.rng.uniform(low, high) * budget))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{self.rng.getrandbits(64):016x}"


def _validate(config: SimConfig) -> None:
    if config.time_scale <= 0 or config.token_window_seconds <= 0:
        raise ValueError("time_scale and token_window_seconds must be positive")
    if config.request_window_seconds <= 0 or config.default_max_tokens < 1:
        raise ValueError("request_window_seconds and default_max_tokens must be positive")
    names = [r.name for r in config.regions]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate region names in {names}")
    for region in config.regions:
        deployments = [d.name for d in region.deployments]
        if len(set(deployments)) != len(deployments):
            raise ValueError(f"duplicate deployments in region {region.name!r}")


SIMULATOR = web.AppKey("balancer.simulator", Simulator)


# --- errors and headers ---------------------------------------------------------------------


class _ApiError(Exception):
    """An OpenAI-shaped error answer, raised anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {
            "error": {"message": self.message, "type": self.type, "param": None, "code": self.code}
        }
        return web.json_response(body, status=self.status, headers=self.headers)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except _ApiError as error:
        return error.response()


async def _tag_region(request: web.Request, response: web.StreamResponse) -> None:
    region = request.match_info.get("region")
    if region in request.app[SIMULATOR].regions:
        response.headers["x-sim-region"] = region


def _ratelimit_headers(region: SimRegion, dep: _Deployment) -> dict[str, str]:
    if region.throttle_headers == "none":
        return {}
    if region.throttle_headers == "minus1":
        tokens = requests = "-1"
    else:
        tokens = str(max(0, math.floor(dep.tokens.level)))
        requests = str(max(0, math.floor(dep.requests.level)))
    return {"x-ratelimit-remaining-tokens": tokens, "x-ratelimit-remaining-requests": requests}


def _throttled(
    sim: Simulator, region: SimRegion, dep: _Deployment, op: str, api_version: str, wait: float
) -> _ApiError:
    if math.isinf(wait):  # a co-tenant eats the whole refill: suggest a simulated minute
        wait = 60 / sim.config.time_scale
    seconds = max(1, math.ceil(wait))
    limit = "call" if dep.requests.level < 1 else "token"
    message = (
        f"Requests to the {_AZURE_OPERATION[op]} Operation under Azure OpenAI API version "
        f"{api_version} have exceeded {limit} rate limit of your current OpenAI S0 pricing tier. "
        f"Please retry after {seconds} second{'s' if seconds > 1 else ''}."
    )
    headers = _ratelimit_headers(region, dep)
    if region.throttle_headers != "none":
        headers["retry-after"] = str(seconds)
        headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
    return _ApiError(429, message, "429", "rate_limit_exceeded", headers)


# --- request handling -----------------------------------------------------------------------


def _authorize(region: SimRegion, key: str | None) -> None:
    if not key:
        raise _ApiError(401, "Access denied due to missing subscription key.", "401", "auth_error")
    if region.api_key is not None and key != region.api_key:
        message = "Access denied due to invalid subscription key or wrong API endpoint."
        raise _ApiError(401, message, "401", "auth_error")


async def _read_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _ApiError(400, f"Request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "Request body must be a JSON object.", "invalid_json")
    return body


async def _azure_handler(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    region = sim.region(request.match_info["region"])
    _authorize(region, request.headers.get("api-key"))
    api_version = request.query.get("api-version")
    if not api_version:
        raise _ApiError(404, "Resource not found", "404")
    body = await _read_body(request)
    op = request.match_info["op"]
    return await _serve(request, region, request.match_info["deployment"], op, body, api_version)


async def _openai_handler(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    region = sim.region(request.match_info["region"])
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    _authorize(region, key.strip() if scheme.lower() == "bearer" else None)
    body = await _read_body(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _ApiError(400, "You must provide a model parameter.", "missing_required_parameter")
    return await _serve(request, region, model, request.match_info["op"], body, "v1")


def _estimate(op: str, body: dict[str, Any], default_max_tokens: int) -> tuple[int, int, int]:
    """(prompt tokens, completion budget, choices), validating what the estimate reads."""
    required = _REQUIRED_FIELD[op]
    if body.get(required) in (None, "", []):
        raise _ApiError(400, f"'{required}' is a required property", "missing_required_parameter")
    if op == "chat/completions" and not isinstance(body["messages"], list):
        raise _ApiError(400, "'messages' must be an array", "invalid_type")
    try:
        prompt = cost.prompt_tokens(op, body)
        budget = cost.completion_budget(op, body, default_max_tokens)
    except (TypeError, ValueError) as exc:
        raise _ApiError(400, f"Invalid request: {exc}", "invalid_value") from None
    n = body.get("n")
    choices = n if isinstance(n, int) and n > 0 and op != "embeddings" else 1  # as cost counts n
    if op != "embeddings" and budget < choices:
        raise _ApiError(400, "max_tokens must be at least 1", "invalid_value")
    if prompt + budget > CONTEXT_TOKENS:
        message = f"This model's maximum context length is {CONTEXT_TOKENS} tokens."
        raise _ApiError(400, message, "context_length_exceeded")
    return prompt, budget, choices


async def _serve(
    request: web.Request,
    region: SimRegion,
    deployment: str,
    op: str,
    body: dict[str, Any],
    api_version: str,
) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    dep = sim.deployment(region, deployment)
    dep.stats.requests += 1
    prompt, budget, choices = _estimate(op, body, sim.config.default_max_tokens)
    if region.fail_rate > 0 and sim.rng.random() < region.fail_rate:
        dep.stats.failed += 1
        message = "The server had an error while processing your request."
        status = region.fail_status
        raise _ApiError(
            status, message, str(status), "server_error", _ratelimit_headers(region, dep)
        )
    wait = dep.admit(prompt + budget, sim.clock())
    if wait > 0:
        dep.stats.throttled += 1
        raise _throttled(sim, region, dep, op, api_version, wait)
    headers = _ratelimit_headers(region, dep)
    if region.hang:
        dep.stats.failed += 1
        await _hang(sim, request)
        raise _ApiError(503, "The simulator is shutting down.", "503", "server_error")
    if region.malformed:
        dep.stats.failed += 1
        return _malformed(region.malformed, headers)

    call = _Call(sim, region, dep, op, deployment, prompt, budget // choices)
    if op != "embeddings":
        call.lengths = [sim.completion_length(call.per_choice) for _ in range(choices)]
    dep.stats.prompt_tokens += prompt
    dep.stats.completion_tokens += call.completion_tokens
    if body.get("stream") is True and op != "embeddings":
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return await _stream(request, call, include_usage, headers)
    latency = region.latency_base_ms + region.latency_per_token_ms * call.completion_tokens
    await _sleep_ms(latency * region.slowdown)
    payload = _embeddings(call, body) if op == "embeddings" else _completion(call)
    return web.json_response(payload, headers=headers, dumps=_dumps)


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def _hang(sim: Simulator, request: web.Request) -> None:
    """Never answer: wait until the client gives up or the server shuts down."""
    while not sim.closing.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sim.closing.wait(), HANG_POLL_SECONDS)


def _malformed(kind: str, headers: dict[str, str]) -> web.Response:
    if kind == "html":
        page = "<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>"
        return web.Response(status=502, text=page, content_type="text/html", headers=headers)
    cut = '{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"ind'
    return web.Response(text=cut, content_type="application/json", headers=headers)


# --- response bodies ------------------------------------------------------------------------


@dataclass
class _Call:
    """One admitted request, as the answer builders need it."""

    sim: Simulator
    region: SimRegion
    dep: _Deployment
    op: str
    model: str
    prompt: int
    per_choice: int  # completion budget of each choice
    lengths: list[int] = field(default_factory=list)  # completion tokens of each choice

    @property
    def chat(self) -> bool:
        return self.op == "chat/completions"

    @property
    def completion_tokens(self) -> int:
        return sum(self.lengths)

    def usage(self) -> dict[str, int]:
        total = self.prompt + self.completion_tokens
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }

    def finish_reason(self, length: int) -> str:
        return "length" if length >= self.per_choice else "stop"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _completion(call: _Call) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    for index, length in enumerate(call.lengths):
        choice: dict[str, Any] = {"index": index, "logprobs": None}
        if call.chat:
            choice["message"] = {"role": "assistant", "content": WORD * length}
        else:
            choice["text"] = WORD * length
        choices.append({**choice, "finish_reason": call.finish_reason(length)})
    return {
        "id": call.sim.new_id("chatcmpl" if call.chat else "cmpl"),
        "object": "chat.completion" if call.chat else "text_completion",
        "created": int(time.time()),
        "model": call.model,
        "choices": choices,
        "usage": call.usage(),
    }


def _embeddings(call: _Call, body: dict[str, Any]) -> dict[str, Any]:
    value = body["input"]
    # a list of strings or of token lists is a batch; a string or one token list is one input
    batch = isinstance(value, list) and not all(isinstance(x, int) for x in value)
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index in range(len(value) if batch else 1):
        vector = [round(call.sim.rng.uniform(-1, 1), 6) for _ in range(EMBEDDING_DIMS)]
        embedding: Any = vector
        if as_base64:  # some SDK versions ask for packed little-endian float32 by default
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": call.prompt, "total_tokens": call.prompt}
    return {"object": "list", "data": data, "model": call.model, "usage": usage}


def _stream_events(call: _Call, include_usage: bool) -> Iterator[tuple[dict[str, Any], int]]:
    """The SSE chunks of a stream, each with the completion tokens it carries."""
    ident, created = call.sim.new_id("chatcmpl" if call.chat else "cmpl"), int(time.time())
    obj = "chat.completion.chunk" if call.chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish}
        if call.chat:  # text None: the opening chunk that names the role
            choice["delta"] = {"role": "assistant", "content": ""} if text is None else {}
            if text:
                choice["delta"]["content"] = text
        else:
            choice["text"] = text or ""
        body = {"id": ident, "object": obj, "created": created, "model": call.model}
        body["choices"] = [choice]
        if include_usage:  # OpenAI's documented shape: usage null on every chunk but the last
            body["usage"] = None
        return body

    for index, length in enumerate(call.lengths):
        if call.chat:
            yield chunk(index, None), 0
        for start in range(0, length, STREAM_CHUNK_TOKENS):
            tokens = min(STREAM_CHUNK_TOKENS, length - start)
            yield chunk(index, WORD * tokens), tokens
        yield chunk(index, "", call.finish_reason(length)), 0
    if include_usage:
        yield {**chunk(0, ""), "choices": [], "usage": call.usage()}, 0


async def _stream(
    request: web.Request, call: _Call, include_usage: bool, headers: dict[str, str]
) -> web.StreamResponse:
    region = call.region
    await _sleep_ms(region.latency_base_ms * region.slowdown)  # time to first byte
    headers = {**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    for sent, (event, tokens) in enumerate(_stream_events(call, include_usage)):
        if region.reset_after_chunks is not None and sent >= region.reset_after_chunks:
            return _abort(request, call, response)
        await _sleep_ms(region.latency_per_token_ms * tokens * region.slowdown)
        await response.write(f"data: {_dumps(event)}\n\n".encode())
    if region.reset_after_chunks is not None:
        return _abort(request, call, response)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _abort(request: web.Request, call: _Call, response: web.StreamResponse) -> web.StreamResponse:
    """Drop the connection mid-stream, as a crashing backend or a flaky network would."""
    call.dep.stats.failed += 1
    if request.transport is not None:
        request.transport.abort()
    return response


# --- control endpoints ----------------------------------------------------------------------


async def _get_knobs(request: web.Request) -> web.Response:
    region = request.app[SIMULATOR].region(request.match_info["region"])
    return web.json_response(region_knobs(region))


async def _set_knobs(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    region = sim.region(request.match_info["region"])
    body = await _read_body(request)
    errors = [f"unknown field {k!r}" for k in body if k not in _KNOBS]
    errors += [
        f"invalid value for {k!r}: {v!r}"
        for k, v in body.items()
        if k in _KNOBS and not _KNOBS[k](v)
    ]
    if errors:
        raise _ApiError(400, "; ".join(errors), "invalid_knob")
    sim.set_knobs(region, body)
    return web.json_response(region_knobs(region))


async def _stats(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    now = sim.clock()
    regions: dict[str, dict[str, Any]] = {}
    for (region, name), dep in sim.deployments.items():
        regions.setdefault(region, {})[name] = dep.snapshot(now)
    return web.json_response({"regions": regions})


async def _reset(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    now = sim.clock()
    for dep in sim.deployments.values():
        dep.reset(now)
    return web.json_response({"reset": True})


async def _on_shutdown(app: web.Application) -> None:
    app[SIMULATOR].closing.set()


def create_app(config: SimConfig, *, clock: Clock = time.monotonic) -> web.Application:
    """The simulator app; `clock` (monotonic seconds) drives the buckets and can be faked."""
    app = web.Application(middlewares=[_errors])
    app[SIMULATOR] = Simulator(config, clock)
    app.on_response_prepare.append(_tag_region)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_post("/_sim/reset", _reset)
    app.router.add_get("/_sim/regions/{region}", _get_knobs)
    app.router.add_post("/_sim/regions/{region}", _set_knobs)
    app.router.add_post(
        "/{region}/openai/deployments/{deployment}/{op:" + _OPERATIONS + "}", _azure_handler
    )
    app.router.add_post("/{region}/v1/{op:" + _OPERATIONS + "}", _openai_handler)
    return app


# --- running --------------------------------------------------------------------------------


async def start(
    config: SimConfig, host: str = "127.0.0.1", port: int = 0, *, clock: Clock = time.monotonic
) -> tuple[web.AppRunner, str]:
    """Serve a simulator; returns its runner (call `cleanup()`) and base URL."""
    runner = web.AppRunner(create_app(config, clock=clock), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_port = runner.addresses[0][1]
    url_host = "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound_port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `balancer simulate` (also used by `python -m balancer.simulator`)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="10: a simulated minute lasts 6 s (default 1, or the config's gateway.time_scale)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="simulate the regions of this regions.yaml (same TPM/RPM) instead of the reference",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--regions", choices=["reference"], default="reference")
    parser.add_argument("--deployment", default="gpt-4", help="deployment name in every region")
    parser.add_argument("--api-key", default=None, help="key every region requires (default: any)")
    parser.add_argument("--latency-base-ms", type=float, default=20.0)
    parser.add_argument("--latency-per-token-ms", type=float, default=0.5)
    parser.add_argument("--token-window-seconds", type=float, default=10.0)
    parser.add_argument("--default-max-tokens", type=int, default=1024)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    if args.config:
        from balancer import config as config_mod
        from balancer import embedded

        cfg = config_mod.load(args.config, simulate=True)
        sim = embedded.simulator_config(
            cfg,
            seed=args.seed,
            keyed=False,
            latency_base_ms=args.latency_base_ms,
            latency_per_token_ms=args.latency_per_token_ms,
        )
        if args.time_scale is not None:
            sim = replace(sim, time_scale=args.time_scale)
        return sim
    regions = reference_regions(
        args.deployment,
        api_key=args.api_key,
        latency_base_ms=args.latency_base_ms,
        latency_per_token_ms=args.latency_per_token_ms,
    )
    return SimConfig(
        regions,
        time_scale=args.time_scale or 1.0,
        token_window_seconds=args.token_window_seconds,
        default_max_tokens=args.default_max_tokens,
        seed=args.seed,
    )


async def main_async(config: SimConfig, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Serve until cancelled (Ctrl-C)."""
    runner, url = await start(config, host, port)
    for region in config.regions:
        deployments = ", ".join(f"{d.name} {d.tpm} TPM" for d in region.deployments)
        print(f"{url}/{region.name}  ({deployments})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="balancer simulate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(config_from_args(args), args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
