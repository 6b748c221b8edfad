"""Routes naming a stored response: retrieve, delete, cancel, list its input items. They
cost no tokens, check the region's key, and count in the region's store counters: a call
naming an id the region does not hold is what a gateway's affinity must never send."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from balancer.sim.errors import ApiError
from balancer.sim.handlers import padded
from balancer.sim.routes import Handler, Style, open_call
from balancer.sim.state import SIMULATOR
from balancer.sim.store import ResponseStore, StoredResponse

Action = Callable[[web.Request, ResponseStore, StoredResponse], Awaitable[dict[str, Any]]]
MAX_LIMIT = 100


def add_routes(router: web.UrlDispatcher, prefix: str, style: Style) -> None:
    """The id routes under `prefix` (".../responses")."""
    base = prefix + "/{response_id}"
    router.add_get(base, _handler(style, _retrieve))
    router.add_delete(base, _handler(style, _delete))
    router.add_post(base + "/cancel", _handler(style, _cancel))
    router.add_get(base + "/input_items", _handler(style, _input_items))


def _handler(style: Style, action: Action) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        region, _ = open_call(request, style)
        sim = request.app[SIMULATOR]
        store = sim.stores[region.name]
        ident = request.match_info["response_id"]
        entry = store.find(ident, sim.clock())
        if entry is None:
            raise ApiError(404, f"Response with id '{ident}' not found.", None)
        return padded(web.json_response(await action(request, store, entry)), region)

    return handle


async def _retrieve(
    request: web.Request, store: ResponseStore, entry: StoredResponse
) -> dict[str, Any]:
    return entry.body()  # `?stream=true` (replaying the events) is not simulated


async def _delete(
    request: web.Request, store: ResponseStore, entry: StoredResponse
) -> dict[str, Any]:
    store.delete(entry.reply.id)
    return {"id": entry.reply.id, "object": "response", "deleted": True}


async def _cancel(
    request: web.Request, store: ResponseStore, entry: StoredResponse
) -> dict[str, Any]:
    if not entry.reply.background:
        message = "Only responses created with background=true can be cancelled."
        raise ApiError(400, message, None)
    if entry.pending:  # a finished (or already cancelled) one is returned as it is
        entry.status = "cancelled"
    return entry.body()


async def _input_items(
    request: web.Request, store: ResponseStore, entry: StoredResponse
) -> dict[str, Any]:
    query = request.query
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        message = f"Invalid 'limit': expected an integer from 1 to {MAX_LIMIT}."
        raise ApiError(400, message, "invalid_value", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        message = "Invalid 'order': expected 'asc' or 'desc'."
        raise ApiError(400, message, "invalid_value", param="order")
    items = entry.items if order == "asc" else entry.items[::-1]
    start = 0
    if "after" in query:
        ids = [item["id"] for item in items]
        if query["after"] not in ids:
            message = f"Invalid 'after': no item with id '{query['after']}'."
            raise ApiError(400, message, "invalid_value", param="after")
        start = ids.index(query["after"]) + 1
    page = items[start : start + limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + limit < len(items),
    }
