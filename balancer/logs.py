"""Structured logs: one JSON object per line, for every logger.

A record's `fields` (passed as `extra={"fields": {...}}`) become top-level keys,
so the per-request access line is flat and greppable. Nothing here adds request
bodies or headers: secrets stay out by construction.

The access line is the one log line every request writes, so it has its own path,
`AccessLog`: batched, off the request path (see its docstring).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

_stream: TextIO | None = None  # where `setup` sends every log line
_worker: int | None = None  # `serve --workers N`: this process's worker number


def set_worker(worker: int) -> None:
    """Every line this process writes carries `"worker": worker` from now on."""
    global _worker
    _worker = worker


def line(created: float, level: str, logger: str, message: str,
         fields: dict[str, Any] | None = None, exception: str | None = None) -> str:
    out = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z",
        "level": level,
        "logger": logger,
        "message": message,
    }
    if _worker is not None:
        out["worker"] = _worker
    if fields:
        out.update(fields)
    if exception:
        out["exception"] = exception
    return json.dumps(out, default=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        return line(record.created, record.levelname.lower(), record.name, record.getMessage(),
                    fields if isinstance(fields, dict) else None,
                    self.formatException(record.exc_info) if record.exc_info else None)


def setup(level: str) -> None:
    global _stream
    _stream = sys.stderr
    handler = logging.StreamHandler(_stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # we write our own


class AccessLog:
    """One line per request, at INFO on `logger`. Under `setup` (the CLI) the lines are
    formatted as JsonFormatter formats them, kept, and written together by `run` every
    `interval` seconds (or at `batch` lines): ~15 µs a line instead of ~45 µs through
    logging's record, handler lock and a write + flush per line, which cost 15 points of
    the gateway's throughput (BENCHMARKS.md section 2). A crash loses at most `interval`
    of lines; a shutdown flushes them. Without `setup` (tests, an embedding program)
    each line goes through logging, to whatever handlers are configured."""

    def __init__(self, logger: logging.Logger, interval: float = 0.1, batch: int = 256):
        self.logger = logger
        self.interval = interval
        self.batch = batch
        self._pending: list[tuple[float, dict[str, Any]]] = []

    def write(self, fields: dict[str, Any]) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if _stream is None:
            self.logger.info("request", extra={"fields": fields})
            return
        self._pending.append((time.time(), fields))
        if len(self._pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self._pending or _stream is None:
            return
        name = self.logger.name
        text = "".join(line(t, "info", name, "request", f) + "\n" for t, f in self._pending)
        self._pending.clear()
        try:
            _stream.write(text)
            _stream.flush()
        except (OSError, ValueError):  # the stream is gone (closed at exit): nowhere to log
            pass

    async def run(self) -> None:
        """Flush every `interval` seconds until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                self.flush()
        finally:
            self.flush()
