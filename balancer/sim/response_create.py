"""POST responses: its estimate (a continuation re-reads the response it follows), then its
answer, whole, streamed or in the background, stored in the region unless `store` is false."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from balancer.operations import OPERATIONS
from balancer.sim.answers import Call, dumps
from balancer.sim.config import SimRegion
from balancer.sim.errors import ApiError
from balancer.sim.response_objects import Reply, input_items, stream_events
from balancer.sim.state import Simulator
from balancer.sim.store import StoredResponse
from balancer.sim.streaming import latency_ms, sleep_ms, write_stream


def _check(body: dict[str, Any]) -> None:
    items, previous = body.get("input"), body.get("previous_response_id")
    if items in (None, "", []) and previous is None:
        raise ApiError(400, "Missing required parameter: 'input'.",
                       "missing_required_parameter", param="input")
    if items is not None and not isinstance(items, str | list):
        raise ApiError(400, "Invalid type for 'input': expected a string or an array.",
                       "invalid_type", param="input")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise ApiError(400, "Invalid 'previous_response_id': expected a non-empty string.",
                       "invalid_type", param="previous_response_id")
    if body.get("background") is True and body.get("store") is False:
        raise ApiError(400, "Background responses must be stored: set store to true.",
                       "invalid_value", param="store")


def estimate(sim: Simulator, region: SimRegion, body: dict[str, Any]) -> tuple[int, int]:
    """(input tokens, output budget). The input includes the previous response's context,
    which must be stored in this region: a continuation re-reads (and is billed for) the
    whole conversation."""
    _check(body)
    operation = OPERATIONS["responses"]
    try:
        prompt = operation.prompt_tokens(body)
        budget = operation.completion_budget(body, sim.config.default_max_tokens)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"Invalid request: {exc}", "invalid_value") from None
    if budget < 1:
        raise ApiError(400, "max_output_tokens must be at least 1", "invalid_value",
                       param="max_output_tokens")
    previous = body.get("previous_response_id")
    if previous is not None:
        entry = sim.stores[region.name].find(previous, sim.clock())
        if entry is None:
            raise ApiError(400, f"Previous response with id '{previous}' not found.",
                           "previous_response_not_found", param="previous_response_id")
        prompt += entry.context_tokens
    return prompt, budget


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()


async def answer(
    request: web.Request, call: Call, body: dict[str, Any], headers: dict[str, str]
) -> web.StreamResponse:
    """The admitted response: at once and queued (background), streamed, or whole."""
    sim = call.sim
    reply = Reply(call.model, body, call.prompt, call.completion_tokens, call.per_choice)
    stream = body.get("stream") is True

    def keep(status: str, ready_at: float | None = None) -> None:
        if body.get("store") is not False:
            entry = StoredResponse(reply, input_items(body.get("input")), status, ready_at)
            sim.stores[call.region.name].add(entry)

    if reply.background and not stream:
        keep("queued", sim.clock() + latency_ms(call) / 1000)  # done once its latency passed
        return web.json_response(reply.obj("queued"), headers=headers, dumps=dumps)
    if stream:
        keep(reply.final_status)  # the region finishes it even if the client leaves mid-stream
        *events, (last, _) = [(_sse(e), tokens) for e, tokens in stream_events(reply)]
        return await write_stream(request, call, events, last, headers)
    await sleep_ms(latency_ms(call))
    keep(reply.final_status)
    return web.json_response(reply.obj(reply.final_status), headers=headers, dumps=dumps)
