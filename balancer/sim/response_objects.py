"""Responses API objects, as OpenAI's SDK parses them: the response in each status, its
output message, its input items, and the events of its stream."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from balancer.sim.answers import STREAM_CHUNK_TOKENS, WORD
from balancer.sim.store import DONE


def new_id(prefix: str) -> str:
    """A fresh id: random, not drawn from the seeded generator, so that responses made by
    two simulators with one seed (or one restarted) never share an id."""
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class Reply:
    """One created response: everything fixed at creation, rendered in any status."""

    model: str
    request: dict[str, Any]  # the create body: the fields a response echoes
    input_tokens: int  # the previous response's context included
    output_tokens: int
    budget: int
    id: str = field(default_factory=lambda: new_id("resp"))
    message_id: str = field(default_factory=lambda: new_id("msg"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def final_status(self) -> str:
        """Like chat's finish_reason "length": the output used the whole budget."""
        return "incomplete" if self.output_tokens >= self.budget else "completed"

    @property
    def text(self) -> str:
        return WORD * self.output_tokens

    @property
    def background(self) -> bool:
        return self.request.get("background") is True

    def message(self, opening: bool = False) -> dict[str, Any]:
        """The output message as it ends, or (`opening`) as a stream announces it: empty."""
        return {
            "id": self.message_id,
            "type": "message",
            "status": "in_progress" if opening else self.final_status,
            "role": "assistant",
            "content": [] if opening else [text_part(self.text)],
        }

    def usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def obj(self, status: str) -> dict[str, Any]:
        """The response object in `status`; only a finished one has output and usage."""
        req, done = self.request, status in DONE
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": self.background,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": req.get("instructions"),
            "max_output_tokens": req.get("max_output_tokens"),
            "model": self.model,
            "output": [self.message()] if done else [],
            "parallel_tool_calls": req.get("parallel_tool_calls", True),
            "previous_response_id": req.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": req.get("store", True),
            "temperature": req.get("temperature", 1.0),
            "text": req.get("text") or {"format": {"type": "text"}},
            "tool_choice": req.get("tool_choice", "auto"),
            "tools": req.get("tools") or [],
            "top_p": req.get("top_p", 1.0),
            "truncation": req.get("truncation", "disabled"),
            "usage": self.usage() if done else None,
            "user": req.get("user"),
            "metadata": req.get("metadata") or {},
        }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def stream_events(reply: Reply) -> list[tuple[dict[str, Any], int]]:
    """The events of a streamed response, each with the output tokens it carries; the last
    one (response.completed or .incomplete) carries the finished response, usage included."""
    events: list[tuple[dict[str, Any], int]] = []

    def add(kind: str, tokens: int = 0, **fields: Any) -> None:
        events.append(({"type": kind, "sequence_number": len(events), **fields}, tokens))

    at = {"item_id": reply.message_id, "output_index": 0, "content_index": 0}
    started = reply.obj("in_progress")
    add("response.created", response=started)
    add("response.in_progress", response=started)
    add("response.output_item.added", output_index=0, item=reply.message(opening=True))
    add("response.content_part.added", **at, part=text_part(""))
    for start in range(0, reply.output_tokens, STREAM_CHUNK_TOKENS):
        tokens = min(STREAM_CHUNK_TOKENS, reply.output_tokens - start)
        add("response.output_text.delta", tokens, **at, delta=WORD * tokens, logprobs=[])
    add("response.output_text.done", **at, text=reply.text, logprobs=[])
    add("response.content_part.done", **at, part=text_part(reply.text))
    add("response.output_item.done", output_index=0, item=reply.message())
    add(f"response.{reply.final_status}", response=reply.obj(reply.final_status))
    return events


def input_items(value: Any) -> list[dict[str, Any]]:
    """A create body's `input` as stored items, each with an id: a string or an easy
    message ({"role", "content"}) becomes a message item; other items (function call
    outputs, ...) keep their shape."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    return [_item(item) for item in items]


def _item(item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        item = {"role": "user", "content": item}
    if not isinstance(item, dict):
        return {"id": new_id("msg"), "type": "message", "role": "user", "content": []}
    if item.get("type", "message") != "message":
        return {"id": new_id("item"), "status": "completed", **item}
    role = item.get("role", "user")
    content = item.get("content")
    if isinstance(content, str):  # the part type follows the role, as the API stores it
        part = "output_text" if role == "assistant" else "input_text"
        content = [{"type": part, "text": content}]
        if role == "assistant":
            content[0]["annotations"] = []
    return {
        "id": item.get("id") or new_id("msg"),
        "type": "message",
        "role": role,
        "content": content if isinstance(content, list) else [],
        "status": "completed",
    }
