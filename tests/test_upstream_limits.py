"""Bounds on what crosses the gateway (issue 17, part 3): a region's answer past
`gateway.max_upstream_body_bytes` (whole or streamed), request bodies with a repeated
key, and the simulator staying quiet when a client leaves mid-stream. End to end:
the simulator (`pad_bytes` knob) behind a real gateway, over HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from balancer import sim, validate
from balancer.errors import ClientError
from balancer.operations import OPERATIONS
from balancer.sim import SimConfig, SimDeployment, SimRegion, identity
from tests.conftest import Stack, StackFactory, gateway_config
from tests.faults.rawhttp import exchange, request_bytes
from tests.procs import PYTHON, Procs
from tests.test_entra import CID_A, entra, entra_config, idp  # noqa: F401 (fixtures)

CHAT = {"model": "gpt-4", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
RESPONSE = {"model": "gpt-4", "max_output_tokens": 8, "input": "hi"}
CAP = 65_536  # the smallest max_upstream_body_bytes allowed
OVER = 3 * CAP


async def post(url: str, body: dict[str, Any] | bytes) -> tuple[int, dict[str, str], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s, s.post(
            url, data=data, headers={"Content-Type": "application/json"}) as r:
        raw = await r.read()
        return r.status, dict(r.headers), json.loads(raw)


async def stream(url: str, body: dict[str, Any]) -> tuple[int, list[bytes], bytes]:
    """Status, the `data:` payloads, and every byte the client got."""
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        raw = await r.read()
    data = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    return r.status, data, raw


async def upstream_errors(s: Stack, reason: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{s.url}/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("balancer_upstream_errors_total{") and
               f'reason="{reason}"' in line)


async def calls(s: Stack) -> dict[str, int]:
    return {region: sum(d["requests"] for d in deps.values())
            for region, deps in (await s.sim_stats()).items()}


# --------------------------------------------------------------------------- upstream bodies


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT),
                                       ("/v1/responses", RESPONSE)])
async def test_an_oversized_answer_is_a_502_and_each_region_a_failure(
        stack: StackFactory, path: str, body: dict[str, Any]) -> None:
    s = await stack(gateway_config({"a": 60_000, "b": 60_000},
                                   max_upstream_body_bytes=CAP))
    for region in ("a", "b"):
        await s.knobs(region, pad_bytes=OVER)
    status, headers, payload = await post(f"{s.url}{path}", body)
    assert status == 502, payload
    assert payload["error"]["code"] == "upstream_body_too_large"
    assert payload["error"]["type"] == "upstream_error"
    assert str(CAP) in payload["error"]["message"]
    assert headers["Content-Type"].startswith("application/json")
    assert await calls(s) == {"a": 1, "b": 1}  # each tried once, then given up
    assert await upstream_errors(s, "upstream_body_too_large") == 2


async def test_an_oversized_answer_is_retried_elsewhere(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000, "b": 60_000},
                                   max_upstream_body_bytes=CAP))
    await s.knobs("a", pad_bytes=OVER)
    # The pick is random (equal weights): send until "a" was tried, bounded; each answer
    # must still come whole from "b" (a 1-in-2**40 chance of never picking "a").
    for _ in range(40):
        status, headers, payload = await post(f"{s.url}/v1/chat/completions", CHAT)
        assert status == 200 and headers["x-balancer-region"] == "b", payload
        if (await calls(s))["a"] >= 1:
            break
    assert (await calls(s))["a"] >= 1  # it was picked at least once, and failed over


async def test_an_entra_401_is_read_within_the_cap(entra: Any, idp: Any) -> None:  # noqa: F811
    """The Entra retry (outbound.send) no longer reads a 401 whole before refreshing: the
    attempt reads it, within the cap, whether or not a fresh token was tried."""
    s = await entra(entra_config(("bad", CID_A, 0), circuit_failures=10))
    await s.knobs("bad", entra_secret="not-the-identity-key")
    for _ in range(2):  # a refresh and a second 401; then no refresh (just done)
        status, _, raw = await s.chat()
        assert status == 401, raw
        assert json.loads(raw)["error"]["message"] == identity.BAD_TOKEN  # relayed as sent
    assert idp.issued[CID_A] == 2


async def test_an_answer_within_the_cap_is_relayed_whole(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}, max_upstream_body_bytes=CAP))
    await s.knobs("a", pad_bytes=CAP - 2_000)
    status, _, payload = await post(f"{s.url}/v1/chat/completions", CHAT)
    assert status == 200 and payload["object"] == "chat.completion"
    assert await upstream_errors(s, "upstream_body_too_large") == 0


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT),
                                       ("/v1/responses", RESPONSE)])
async def test_an_oversized_stream_ends_with_an_error_event(
        stack: StackFactory, path: str, body: dict[str, Any]) -> None:
    s = await stack(gateway_config({"a": 60_000}, max_upstream_body_bytes=CAP))
    await s.knobs("a", pad_bytes=OVER)
    status, data, raw = await stream(f"{s.url}{path}", {**body, "stream": True})
    assert status == 200
    assert len(data) >= 2, raw[:300]  # the first event came through before the cut
    error = json.loads(data[-1])["error"]
    assert error["code"] == "upstream_body_too_large" and str(CAP) in error["message"]
    assert b"[DONE]" not in raw and b"response.completed" not in raw
    assert len(raw) <= CAP + 4096  # nothing past the cap was relayed
    assert await upstream_errors(s, "upstream_body_too_large") == 1


async def test_an_oversized_stored_response_is_a_502(stack: StackFactory) -> None:
    """Calls on a stored response (by id) read its region's answer within the cap too."""
    s = await stack(gateway_config({"a": 60_000}, max_upstream_body_bytes=CAP))
    status, _, created = await post(f"{s.url}/v1/responses", RESPONSE)
    assert status == 200, created
    await s.knobs("a", pad_bytes=OVER)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{s.url}/v1/responses/{created['id']}") as r:
            status, payload = r.status, await r.json()
        assert status == 502 and payload["error"]["code"] == "upstream_body_too_large"
        await s.knobs("a", pad_bytes=0)
        async with session.get(f"{s.url}/v1/responses/{created['id']}") as r:
            assert r.status == 200 and (await r.json())["id"] == created["id"]
    assert await upstream_errors(s, "upstream_body_too_large") == 1


async def test_a_stream_within_the_cap_is_relayed_whole(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}, max_upstream_body_bytes=CAP))
    await s.knobs("a", pad_bytes=CAP // 2)
    status, data, raw = await stream(f"{s.url}/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and data[-1] == b"[DONE]", raw[-300:]
    assert raw.count(b"\n: x") >= 2  # the padding (comment events) was relayed as it came
    assert await upstream_errors(s, "upstream_body_too_large") == 0


# --------------------------------------------------------------------------- duplicate keys

CHAT_OP = OPERATIONS["chat/completions"]


@pytest.mark.parametrize("raw,path", [
    (b'{"model": "gpt-4", "model": "other", "messages": [{"role": "user"}]}', "model"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "a", "content": "b"}]}',
     "messages[0].content"),
    (b'{"model": "gpt-4", "messages": [{"role": "user"}], "max_tokens": 5, "max_tokens": 9000}',
     "max_tokens"),
    (b'{"model": "gpt-4", "messages": [{"role": "user"}], "tools": [{"type": "function", '
     b'"function": {"name": "f", "parameters": {"type": "object", "type": "array"}}}]}',
     "tools[0].function.parameters.type"),
    (b'{"model": "gpt-4", "mod\\u0065l": "other", "messages": [{"role": "user"}]}', "model"),
    (b'{"model": "gpt-4", "messages": [{"role": "user"}], "x": [[{"a": 1}, {"b": 1, "b": 1}]]}',
     "x[0][1].b"),
])
def test_a_repeated_key_is_refused_naming_it(raw: bytes, path: str) -> None:
    with pytest.raises(ClientError) as info:
        validate.parse(CHAT_OP, raw, None)
    error = info.value
    assert (error.status, error.code, error.param) == (400, "duplicate_key", path)
    assert f"'{path}'" in error.message


def test_a_repeated_key_path_stays_short() -> None:
    key = "k" * 100_000
    raw = json.dumps({"model": "gpt-4", "messages": [{"role": "user"}],
                      key: {key: 1}}).encode()[:-2] + f', "{key}": 2}}}}'.encode()
    with pytest.raises(ClientError) as info:
        validate.parse(CHAT_OP, raw, None)
    assert info.value.code == "duplicate_key" and len(info.value.param or "") <= 256


@pytest.mark.parametrize("body", [
    CHAT,
    {**CHAT, "messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                             "content": "b"}]},
    {**CHAT, "metadata": {"model": "x", "messages": 1}, "x": [{"a": 1}, {"a": 2}]},
    {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"type": {"type": "string"}}}}}]},
])
def test_bodies_without_repeated_keys_pass(body: dict[str, Any]) -> None:
    assert validate.parse(CHAT_OP, json.dumps(body).encode(), None).body == body


async def test_a_repeated_key_never_reaches_a_region(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}))
    raw = b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], ' \
          b'"max_tokens": 1, "max_tokens": 100000}'
    for path in ("/v1/chat/completions", "/openai/deployments/gpt-4/chat/completions"
                 "?api-version=2024-06-01"):
        status, _, payload = await post(f"{s.url}{path}", raw)
        assert status == 400 and payload["error"]["code"] == "duplicate_key", payload
        assert payload["error"]["param"] == "max_tokens"
    assert await calls(s) == {"a": 0}


# --------------------------------------------------------------------------- slow headers

SERVE_CONFIG = """gateway: {header_timeout_seconds: 0.5}
regions:
  - name: a
    kind: azure
    endpoint: https://a.example.com
    api_key: ${A_KEY}
    api_version: "2024-06-01"
    deployments:
      gpt-4: {deployment: gpt-4, tpm: 60000}
"""


def test_serve_closes_a_connection_whose_headers_never_end(tmp_path: Path) -> None:
    """`balancer serve` gives aiohttp header_timeout_seconds as its keepalive_timeout: a
    connection without a complete request head that long after it opened is closed,
    with nothing said. (The slow-headers load: tests/faults/test_hostile.py.)"""
    config = tmp_path / "regions.yaml"
    config.write_text(SERVE_CONFIG)
    procs = Procs(tmp_path)
    try:
        url = procs.server("gateway", [PYTHON, "-m", "balancer.cli", "serve", "--simulate",
                                       "--config", str(config), "--host", "127.0.0.1",
                                       "--port", "{port}"], "/healthz")
        port = int(url.rsplit(":", 1)[1])
        for head in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: a",
                     b"POST /v1/chat/compl"):  # unfinished headers; request line
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(head)
                data = sock.recv(65536)  # b"": closed by the gateway
            took = time.monotonic() - started
            assert data == b"" and 0.4 < took < 2.0, (head, data, took)
        ok = exchange(port, request_bytes("POST", "/v1/chat/completions", [
            (b"Content-Type", b"application/json")], json.dumps(CHAT).encode()))
        assert ok.status == 200, ok  # served as ever
    finally:
        procs.close()


# --------------------------------------------------------------------------- the simulator


def sim_config(**knobs: Any) -> SimConfig:
    return SimConfig([SimRegion("a", [SimDeployment("gpt-4", 100_000)], api_key="k",
                                latency_base_ms=0, **knobs)], seed=1)


async def test_sim_pads_answers_and_stays_valid() -> None:
    runner, url = await sim.start(sim_config(pad_bytes=50_000))
    try:
        async with aiohttp.ClientSession(headers={"api-key": "k"}) as s:
            async with s.post(f"{url}/a/openai/v1/chat/completions", json=CHAT) as r:
                raw = await r.read()
            assert r.status == 200 and len(raw) >= 50_000
            assert json.loads(raw)["object"] == "chat.completion"
            async with s.post(f"{url}/a/openai/v1/responses",
                              json={**RESPONSE, "stream": True}) as r:
                raw = await r.read()
            comments = [e for e in raw.split(b"\n\n") if e.startswith(b": ")]
            assert sum(len(e) + 2 for e in comments) >= 50_000
            assert raw.index(b": x") > raw.index(b"response.created")  # after the first event
            assert b"response.completed" in raw
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("path,body", [("/a/openai/v1/chat/completions", CHAT),
                                       ("/a/openai/v1/responses", RESPONSE)])
async def test_sim_logs_no_traceback_when_a_client_leaves_mid_stream(
        caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any]) -> None:
    """It logged aiohttp's "Error handling request" with a ClientConnectionResetError
    traceback at ERROR: a gateway relaying to a client that left is ordinary."""
    caplog.set_level(logging.DEBUG)
    runner, url = await sim.start(sim_config(latency_per_token_ms=5))
    try:
        data = json.dumps({**body, "max_tokens": 200, "max_output_tokens": 200,
                           "stream": True}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\napi-key: k\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)  # head + first event
        assert first.startswith(b"HTTP/1.1 200")
        writer.transport.abort()
        for _ in range(50):  # the simulator notices at its next write
            if any("client left mid-stream" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    assert any("client left mid-stream" in r.getMessage() and r.levelno == logging.DEBUG
               for r in caplog.records)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
