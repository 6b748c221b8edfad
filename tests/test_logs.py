"""JSON log lines, and the access log written in batches off the request path."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging

import pytest

from balancer import logs


async def test_access_lines_are_batched_and_flushed_on_shutdown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(logs, "_stream", stream)  # as `logs.setup` does for the CLI
    logger = logging.getLogger("test.access")
    logger.setLevel(logging.INFO)
    access = logs.AccessLog(logger, interval=0.05)
    task = asyncio.create_task(access.run())
    access.write({"request_id": "r1", "status": 200})
    assert stream.getvalue() == ""  # nothing written on the request path
    await asyncio.sleep(0.15)
    [line] = [json.loads(t) for t in stream.getvalue().splitlines()]
    assert line["request_id"] == "r1" and line["status"] == 200
    assert (line["level"], line["logger"], line["message"]) == ("info", "test.access", "request")
    assert line["ts"].endswith("Z") and len(line["ts"]) == len("2026-11-25T06:20:00.000Z")
    access.write({"request_id": "r2", "status": 429})
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert [json.loads(t)["request_id"] for t in stream.getvalue().splitlines()] == ["r1", "r2"]
    logger.setLevel(logging.WARNING)  # access log off
    access.write({"request_id": "r3"})
    access.flush()
    assert "r3" not in stream.getvalue()


def test_a_full_batch_is_written_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(logs, "_stream", stream)
    logger = logging.getLogger("test.access.batch")
    logger.setLevel(logging.INFO)
    access = logs.AccessLog(logger, batch=3)
    for i in range(3):
        access.write({"n": i})
    assert len(stream.getvalue().splitlines()) == 3


def test_without_setup_lines_go_through_logging(caplog: pytest.LogCaptureFixture) -> None:
    access = logs.AccessLog(logging.getLogger("test.access.plain"))
    with caplog.at_level(logging.INFO, logger="test.access.plain"):
        access.write({"request_id": "r9"})
    [record] = caplog.records
    assert record.getMessage() == "request" and record.fields == {"request_id": "r9"}


def test_formatter_and_access_log_share_one_shape() -> None:
    record = logging.LogRecord("balancer", logging.WARNING, __file__, 1, "hello %s", ("x",),
                               None)
    record.fields = {"region": "a"}
    out = json.loads(logs.JsonFormatter().format(record))
    assert out["message"] == "hello x" and out["region"] == "a" and out["level"] == "warning"
