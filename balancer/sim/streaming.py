"""Timing of answers: latency sleeps, server-sent event streams (and their cut), hangs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from aiohttp import web

from balancer.sim.answers import Call
from balancer.sim.state import Simulator

log = logging.getLogger("balancer.sim")

HANG_POLL_SECONDS = 0.2  # how often a hung request checks whether its client left
PAD_EVENT_BYTES = 16384  # the size of each padding event (`pad_bytes`)


async def sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


def latency_ms(call: Call) -> float:
    """How long the whole answer takes, in real milliseconds."""
    region = call.region
    return (region.latency_base_ms + region.latency_per_token_ms * call.completion_tokens) * (
        region.slowdown
    )


async def hang(sim: Simulator, request: web.Request) -> None:
    """Never answer: wait until the client gives up or the server shuts down."""
    while not sim.closing.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sim.closing.wait(), HANG_POLL_SECONDS)


async def write_stream(
    request: web.Request,
    call: Call,
    events: Iterable[tuple[bytes, int]],
    last: bytes,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Send `events` (each with the completion tokens it carries, which pace it), then `last`.
    With the region's `reset_after_chunks` the stream never completes: it is cut after that
    many events, or just before `last`; with its `pad_bytes`, comment events that large in
    all follow the first event. A client leaving mid-stream ends it quietly (a real server
    just stops writing): that is the client's choice, not the simulator's error."""
    region = call.region
    await sleep_ms(region.latency_base_ms * region.slowdown)  # time to first byte
    headers = {**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    try:
        for sent, (event, tokens) in enumerate(events):
            if region.reset_after_chunks is not None and sent >= region.reset_after_chunks:
                return _abort(request, call, response)
            await sleep_ms(region.latency_per_token_ms * tokens * region.slowdown)
            await response.write(event)
            if sent == 0 and region.pad_bytes:
                await _pad(response, region.pad_bytes)
        if region.reset_after_chunks is not None:
            return _abort(request, call, response)
        await response.write(last)
        await response.write_eof()
    except ConnectionError:  # aiohttp's ClientConnectionResetError is one
        log.debug("client left mid-stream: %s", request.path)
    return response


async def _pad(response: web.StreamResponse, size: int) -> None:
    """`size` bytes of SSE comment events (`: xxx...`), which SSE clients ignore."""
    while size > 0:
        event = b": " + b"x" * max(0, min(size, PAD_EVENT_BYTES) - 4) + b"\n\n"
        await response.write(event)
        size -= len(event)


def _abort(request: web.Request, call: Call, response: web.StreamResponse) -> web.StreamResponse:
    """Drop the connection mid-stream, as a crashing backend or a flaky network would."""
    call.dep.stats.failed += 1
    if request.transport is not None:
        request.transport.abort()
    return response
