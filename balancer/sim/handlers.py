"""The path of a create request, whatever its route: the estimated cost, fault injection,
admission and its 429s, then the answer, whole or streamed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from balancer.operations import OPERATIONS
from balancer.sim import response_create
from balancer.sim.answers import Call, completion_body, dumps, embeddings_body, stream_events
from balancer.sim.config import SimRegion
from balancer.sim.errors import ApiError
from balancer.sim.ratelimit import ratelimit_headers, throttled
from balancer.sim.state import SIMULATOR
from balancer.sim.streaming import hang, latency_ms, sleep_ms, write_stream

CONTEXT_TOKENS = 131_072  # largest prompt + completion budget a request may ask for
_REQUIRED_FIELD = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input"}


@dataclass(frozen=True)
class Target:
    """A create request as its route resolved it."""

    region: SimRegion
    deployment: str
    op: str
    body: dict[str, Any]
    api_version: str  # for 429 messages; "v1" on the v1 and OpenAI routes
    azure: bool  # an Azure route: the region's `responses_headers` applies

    @property
    def opaque_headers(self) -> bool:
        """Azure's Responses API: remaining counts "-1", no retry-after."""
        return self.azure and self.op == "responses" and self.region.responses_headers == "azure"


def _estimate(op: str, body: dict[str, Any], default_max_tokens: int) -> tuple[int, int, int]:
    """(prompt tokens, completion budget, choices), validating what the estimate reads."""
    required = _REQUIRED_FIELD[op]
    if body.get(required) in (None, "", []):
        raise ApiError(400, f"'{required}' is a required property", "missing_required_parameter")
    if op == "chat/completions" and not isinstance(body["messages"], list):
        raise ApiError(400, "'messages' must be an array", "invalid_type")
    operation = OPERATIONS[op]
    try:
        prompt = operation.prompt_tokens(body)
        budget = operation.completion_budget(body, default_max_tokens)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"Invalid request: {exc}", "invalid_value") from None
    n = body.get("n")
    choices = n if isinstance(n, int) and n > 0 and op != "embeddings" else 1  # as cost counts n
    if op != "embeddings" and budget < choices:
        raise ApiError(400, "max_tokens must be at least 1", "invalid_value")
    return prompt, budget, choices


async def serve(request: web.Request, target: Target) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    region, op, body = target.region, target.op, target.body
    dep = sim.deployment(region, target.deployment)
    dep.stats.requests += 1
    if op == "responses":
        (prompt, budget), choices = response_create.estimate(sim, region, body), 1
    else:
        prompt, budget, choices = _estimate(op, body, sim.config.default_max_tokens)
    if prompt + budget > CONTEXT_TOKENS:
        message = f"This model's maximum context length is {CONTEXT_TOKENS} tokens."
        raise ApiError(400, message, "context_length_exceeded")
    opaque = target.opaque_headers
    if region.fail_rate > 0 and sim.rng.random() < region.fail_rate:
        dep.stats.failed += 1
        message = "The server had an error while processing your request."
        status = region.fail_status
        headers = ratelimit_headers(region, dep, opaque)
        raise ApiError(status, message, str(status), "server_error", headers)
    wait = dep.admit(prompt + budget, sim.clock())
    if wait > 0:
        dep.stats.throttled += 1
        raise throttled(sim, region, dep, op, target.api_version, wait, opaque)
    headers = ratelimit_headers(region, dep, opaque)
    if region.hang:
        dep.stats.failed += 1
        await hang(sim, request)
        raise ApiError(503, "The simulator is shutting down.", "503", "server_error")
    if region.malformed:
        dep.stats.failed += 1
        return _malformed(region.malformed, headers)

    call = Call(sim, region, dep, op, target.deployment, prompt, budget // choices)
    if op != "embeddings":
        call.lengths = [sim.completion_length(call.per_choice) for _ in range(choices)]
    dep.stats.prompt_tokens += prompt
    dep.stats.completion_tokens += call.completion_tokens
    try:
        return padded(await _answer(request, call, body, headers), region)
    finally:  # a PTU corrects its utilization to the real cost when a request ends
        dep.finished(prompt + budget, prompt + call.completion_tokens, sim.clock())


async def _answer(request: web.Request, call: Call, body: dict[str, Any],
                  headers: dict[str, str]) -> web.StreamResponse:
    op = call.op
    if op == "responses":
        return await response_create.answer(request, call, body, headers)
    if body.get("stream") is True and op != "embeddings":
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        chunks = (
            (f"data: {dumps(chunk)}\n\n".encode(), tokens)
            for chunk, tokens in stream_events(call, include_usage)
        )
        return await write_stream(request, call, chunks, b"data: [DONE]\n\n", headers)
    await sleep_ms(latency_ms(call))
    payload = embeddings_body(call, body) if op == "embeddings" else completion_body(call)
    return web.json_response(payload, headers=headers, dumps=dumps)


def padded(response: web.StreamResponse, region: SimRegion) -> web.StreamResponse:
    """A whole answer with the region's `pad_bytes` of spaces after it: still JSON
    (streams pad as they go: `streaming.write_stream`)."""
    if region.pad_bytes and isinstance(response, web.Response):
        response.body = bytes(response.body) + b" " * region.pad_bytes
    return response


def _malformed(kind: str, headers: dict[str, str]) -> web.Response:
    if kind == "html":
        page = "<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>"
        return web.Response(status=502, text=page, content_type="text/html", headers=headers)
    cut = '{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"ind'
    return web.Response(text=cut, content_type="application/json", headers=headers)
