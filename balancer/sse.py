"""Server-sent events passing through: relay as they arrive, read the usage.

Chunks are forwarded as soon as an event is complete; only events that may carry
the usage are parsed. Each streaming operation names its `StreamFormat` in
`balancer.operations`: how its stream ends, where its usage is, and whether the
gateway must ask the region for the usage (chat and completions streams carry it
only with `stream_options.include_usage`; when the gateway, not the client, asked,
the extra usage-only chunk is read for settlement and dropped, so the client sees
the stream it asked for).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from balancer.usage import Usage

EVENT_END = re.compile(rb"\r?\n\r?\n")
NULL_USAGE = (b'"usage":null', b'"usage": null')


class StreamTap(Protocol):
    """Watches a stream pass: what to forward now, the usage once seen, and whether
    the stream reached its proper end (else it was cut)."""

    usage: Usage | None
    done: bool
    object_id: str | None  # the id of the object the stream creates (a stored response)

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class StreamFormat:
    tap: Callable[[bool], StreamTap]  # called with "strip the usage chunk"
    ask_usage: bool  # the region sends usage only if the request asks for it


class EventTap:
    """Whole events out, split on blank lines; `_keep` decides each event's fate."""

    def __init__(self, usage: Callable[[Any], Usage | None]) -> None:
        self.usage: Usage | None = None
        self.done = False
        self.object_id: str | None = None
        self._usage_of = usage  # the operation's usage reader
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to forward now (whole events only); the rest waits for more data."""
        if not self._buffer and chunk.endswith(b"\n\n") and self._plain(chunk):
            return chunk  # whole events, every one kept as is: no split (the usual chunk)
        data = self._buffer + chunk if self._buffer else chunk
        out: list[bytes] = []
        start = 0
        for match in EVENT_END.finditer(data):
            event = data[start:match.end()]
            start = match.end()
            if self._keep(event):
                out.append(event)
        self._buffer = data[start:]
        return b"".join(out)

    def flush(self) -> bytes:
        """Whatever is left when the upstream closes (an event without its blank line)."""
        rest, self._buffer = self._buffer, b""
        return rest if rest and self._keep(rest) else b""

    def _keep(self, event: bytes) -> bool:
        raise NotImplementedError

    def _plain(self, chunk: bytes) -> bool:
        """True when `_keep` would keep each of the chunk's events and note nothing: it
        goes out whole (cheap substring tests; halves a 16-token stream's tap CPU)."""
        return False


class UsageTap(EventTap):
    """Chat and completions streams: `data: {...}` chunks ending with `data: [DONE]`;
    the usage is in a chunk of its own with `choices: []`."""

    def __init__(self, strip_usage_chunk: bool, usage: Callable[[Any], Usage | None]):
        super().__init__(usage)
        self.strip = strip_usage_chunk

    def _plain(self, chunk: bytes) -> bool:
        # every "usage" a null one (a stream that asked for usage: each chunk has one)
        return b"[DONE]" not in chunk and chunk.count(b'"usage"') == sum(
            chunk.count(n) for n in NULL_USAGE)

    def _keep(self, event: bytes) -> bool:
        if b"[DONE]" in event:
            self.done = True
            return True
        if b'"usage"' not in event or any(n in event for n in NULL_USAGE):
            return True
        payload = data_json(event)
        usage = self._usage_of(payload)
        if usage is None:
            return True
        self.usage = usage
        # The usage-only chunk has no choices; drop it only if we were the ones asking.
        return not (self.strip and isinstance(payload, dict) and payload.get("choices") == [])


class ResponseEventTap(EventTap):
    """Responses API streams: named events (`event: response.output_text.delta`), no
    `[DONE]`; the stream ends with `response.completed`, `.incomplete` or `.failed`,
    whose `response.usage` settles the reservation. The first, `response.created`, names
    the response (its id pins it to the region). Every event is forwarded."""

    FINAL = ("response.completed", "response.incomplete", "response.failed")
    _FINAL_BYTES = tuple(name.encode() for name in FINAL)  # cheap test before parsing
    _CREATED = b"response.created"

    def __init__(self, strip_usage_chunk: bool, usage: Callable[[Any], Usage | None]):
        super().__init__(usage)  # nothing to strip: the usage rides the final event

    def _plain(self, chunk: bytes) -> bool:
        return ((self.object_id is not None or self._CREATED not in chunk)
                and not any(name in chunk for name in self._FINAL_BYTES))

    def _keep(self, event: bytes) -> bool:
        if self.object_id is None and self._CREATED in event:
            self._read_id(data_json(event))
        elif any(name in event for name in self._FINAL_BYTES):
            payload = data_json(event)
            if isinstance(payload, dict) and payload.get("type") in self.FINAL:
                self.done = True
                self.usage = self._usage_of(payload) or self.usage
                if self.object_id is None:
                    self._read_id(payload)
        return True

    def _read_id(self, payload: object) -> None:
        response = payload.get("response") if isinstance(payload, dict) else None
        ident = response.get("id") if isinstance(response, dict) else None
        if isinstance(ident, str) and ident:
            self.object_id = ident


def data_json(event: bytes) -> object:
    """The JSON of an event's `data:` lines, or None."""
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        return None


def error_event(message: str, code: str) -> bytes:
    """The last event of a stream that broke after its first byte reached the client:
    the SDKs raise on an event carrying `error`, so the client knows the answer is cut."""
    payload = {"error": {"message": message, "type": "upstream_error", "param": None,
                         "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
