"""Server-sent events passing through: relay as they arrive, read the usage.

Chunks are forwarded as soon as an event is complete; only events that carry a
non-null `usage` are parsed. When the gateway (not the client) asked for
`stream_options.include_usage`, the extra usage-only chunk is read for
settlement and dropped, so the client sees the stream it asked for.
"""

from __future__ import annotations

import json
import re

from balancer.upstream import usage_of

EVENT_END = re.compile(rb"\r?\n\r?\n")
NULL_USAGE = (b'"usage":null', b'"usage": null')


class UsageTap:
    def __init__(self, strip_usage_chunk: bool):
        self.strip = strip_usage_chunk
        self.usage: tuple[int, int] | None = None
        self.done = False  # saw `data: [DONE]`
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to forward now (whole events only); the rest waits for more data."""
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
        if b"[DONE]" in event:
            self.done = True
            return True
        if b'"usage"' not in event or any(n in event for n in NULL_USAGE):
            return True
        payload = _data_json(event)
        usage = usage_of(payload)
        if usage is None:
            return True
        self.usage = usage
        # The usage-only chunk has no choices; drop it only if we were the ones asking.
        return not (self.strip and isinstance(payload, dict) and payload.get("choices") == [])


def _data_json(event: bytes) -> object:
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
