"""Request handling: authentication, the request's estimated cost, admission and its 429s,
fault injection, then the answer, whole or streamed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from typing import Any

from aiohttp import web

from balancer.operations import OPERATIONS
from balancer.sim.buckets import DeploymentState
from balancer.sim.config import SimRegion
from balancer.sim.errors import ApiError
from balancer.sim.responses import Call, completion_body, dumps, embeddings_body, stream_events
from balancer.sim.state import SIMULATOR, Simulator

CONTEXT_TOKENS = 131_072  # largest prompt + completion budget a request may ask for
HANG_POLL_SECONDS = 0.2  # how often a hung request checks whether its client left
_AZURE_OPERATION = {
    "chat/completions": "ChatCompletions_Create",
    "completions": "Completions_Create",
    "embeddings": "Embeddings_Create",
}
_REQUIRED_FIELD = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input"}


def _ratelimit_headers(region: SimRegion, dep: DeploymentState) -> dict[str, str]:
    if region.throttle_headers == "none":
        return {}
    if region.throttle_headers == "minus1":
        tokens = requests = "-1"
    else:
        tokens = str(max(0, math.floor(dep.tokens.level)))
        requests = str(max(0, math.floor(dep.requests.level)))
    return {"x-ratelimit-remaining-tokens": tokens, "x-ratelimit-remaining-requests": requests}


def _throttled(
    sim: Simulator, region: SimRegion, dep: DeploymentState, op: str, api_version: str, wait: float
) -> ApiError:
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
    return ApiError(429, message, "429", "rate_limit_exceeded", headers)


def _authorize(region: SimRegion, key: str | None) -> None:
    if not key:
        raise ApiError(401, "Access denied due to missing subscription key.", "401", "auth_error")
    if region.api_key is not None and key != region.api_key:
        message = "Access denied due to invalid subscription key or wrong API endpoint."
        raise ApiError(401, message, "401", "auth_error")


async def read_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, f"Request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object.", "invalid_json")
    return body


async def azure_handler(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    region = sim.region(request.match_info["region"])
    _authorize(region, request.headers.get("api-key"))
    api_version = request.query.get("api-version")
    if not api_version:
        raise ApiError(404, "Resource not found", "404")
    body = await read_body(request)
    op = request.match_info["op"]
    return await _serve(request, region, request.match_info["deployment"], op, body, api_version)


async def openai_handler(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    region = sim.region(request.match_info["region"])
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    _authorize(region, key.strip() if scheme.lower() == "bearer" else None)
    body = await read_body(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "You must provide a model parameter.", "missing_required_parameter")
    return await _serve(request, region, model, request.match_info["op"], body, "v1")


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
    if prompt + budget > CONTEXT_TOKENS:
        message = f"This model's maximum context length is {CONTEXT_TOKENS} tokens."
        raise ApiError(400, message, "context_length_exceeded")
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
        raise ApiError(
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
        raise ApiError(503, "The simulator is shutting down.", "503", "server_error")
    if region.malformed:
        dep.stats.failed += 1
        return _malformed(region.malformed, headers)

    call = Call(sim, region, dep, op, deployment, prompt, budget // choices)
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
    payload = embeddings_body(call, body) if op == "embeddings" else completion_body(call)
    return web.json_response(payload, headers=headers, dumps=dumps)


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


async def _stream(
    request: web.Request, call: Call, include_usage: bool, headers: dict[str, str]
) -> web.StreamResponse:
    region = call.region
    await _sleep_ms(region.latency_base_ms * region.slowdown)  # time to first byte
    headers = {**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    for sent, (event, tokens) in enumerate(stream_events(call, include_usage)):
        if region.reset_after_chunks is not None and sent >= region.reset_after_chunks:
            return _abort(request, call, response)
        await _sleep_ms(region.latency_per_token_ms * tokens * region.slowdown)
        await response.write(f"data: {dumps(event)}\n\n".encode())
    if region.reset_after_chunks is not None:
        return _abort(request, call, response)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _abort(request: web.Request, call: Call, response: web.StreamResponse) -> web.StreamResponse:
    """Drop the connection mid-stream, as a crashing backend or a flaky network would."""
    call.dep.stats.failed += 1
    if request.transport is not None:
        request.transport.abort()
    return response
