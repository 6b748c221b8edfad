"""The responses a region stores (Responses API `store`, the default), and the counters
that show whether follow-ups naming an id reached the region that holds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only annotations: response_objects reaches back to the state
    from balancer.sim.response_objects import Reply

DONE = ("completed", "incomplete")  # statuses whose response carries output and usage
PENDING = ("queued", "in_progress")  # background responses still being worked on


@dataclass
class StoredResponse:
    reply: Reply
    items: list[dict[str, Any]]  # its input items, each with an id
    status: str
    ready_at: float | None = None  # background: when (on sim.clock) its answer is done

    def refresh(self, now: float) -> None:
        """A background response finishes once the time it takes has passed."""
        if self.status in PENDING and self.ready_at is not None and now >= self.ready_at:
            self.status = self.reply.final_status

    def body(self) -> dict[str, Any]:
        return self.reply.obj(self.status)

    @property
    def pending(self) -> bool:
        return self.status in PENDING

    @property
    def context_tokens(self) -> int:
        """What a continuation re-reads: this response's input, and its output if any."""
        output = self.reply.output_tokens if self.status in DONE else 0
        return self.reply.input_tokens + output


class ResponseStore:
    """One region's stored responses, by id, and its id-lookup counters."""

    def __init__(self) -> None:
        self.responses: dict[str, StoredResponse] = {}
        self.id_calls = 0  # id routes, and creates naming a previous_response_id
        self.not_found = 0  # of those, the ones naming an id this region does not hold

    def add(self, entry: StoredResponse) -> None:
        self.responses[entry.reply.id] = entry

    def find(self, ident: str, now: float) -> StoredResponse | None:
        """The stored response `ident` (counted as an id call), brought up to `now`."""
        self.id_calls += 1
        entry = self.responses.get(ident)
        if entry is None:
            self.not_found += 1
            return None
        entry.refresh(now)
        return entry

    def delete(self, ident: str) -> None:
        self.responses.pop(ident, None)

    def stats(self) -> dict[str, int]:
        return {"stored": len(self.responses), "id_calls": self.id_calls,
                "not_found": self.not_found}

    def reset_counters(self) -> None:
        """Counters only: the stored responses stay, as they would in the region."""
        self.id_calls = self.not_found = 0
