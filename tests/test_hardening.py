"""Regression tests, one per bug the fault and hostile-input suites (tests/faults/)
found: each sends the input that broke the gateway and checks the fixed answer."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import tomllib
from pathlib import Path
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from balancer import protocol, validate
from balancer.errors import ClientError
from balancer.operations import OPERATIONS
from tests.conftest import Stack, StackFactory, gateway_config
from tests.faults.rawhttp import exchange, parse, request_bytes

CHAT_OP = OPERATIONS["chat/completions"]
CHAT = {"model": "gpt-4", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
JSON = [(b"Content-Type", b"application/json")]


def port_of(s: Stack) -> int:
    return int(s.url.rsplit(":", 1)[1])


async def raw(s: Stack, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reply = await asyncio.to_thread(exchange, port_of(s), data, timeout=10)
    return reply.status, {k: v[0] for k, v in reply.headers.items()}, reply.body


def until_closed(port: int, data: bytes) -> bytes:
    """Send `data` and read until the server closes (a timeout if it keeps the socket)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        buf = b""
        while chunk := sock.recv(65536):
            buf += chunk
    return buf


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info]


async def sim_calls(s: Stack) -> int:
    return sum(d["requests"] for deps in (await s.sim_stats()).values() for d in deps.values())


async def test_unparseable_http_gets_an_openai_error_and_no_traceback(
        stack: StackFactory, caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp answered parser errors in text/plain and logged a traceback at ERROR
    for each (balancer/protocol.py)."""
    s = await stack(gateway_config({"a": 60_000}))
    caplog.set_level(logging.INFO)
    for data in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-a\x01: b\r\n\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nx-request-id: a\rSet-Cookie: x\r\n\r\n",
                 b"GET /healthz HTTP/1.1\r\nx-long: " + b"a" * 9000 + b"\r\n\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n"):
        reply = parse(await asyncio.to_thread(until_closed, port_of(s), data), final=True)
        assert reply is not None
        status, body = reply.status, reply.body
        headers = {k: v[0] for k, v in reply.headers.items()}
        assert status == 400 and headers["content-type"].startswith("application/json"), (
            "aiohttp no longer sends parse errors through RequestHandler.handle_error: "
            "see the docstring of balancer/protocol.py")
        assert json.loads(body)["error"]["code"] == "invalid_http"
        assert "set-cookie" not in headers
    assert not errors_logged(caplog)
    refused = [r for r in caplog.records if "malformed HTTP" in r.getMessage()]
    assert len(refused) == 4 and all(r.levelno == logging.INFO for r in refused)
    assert refused[0].getMessage().endswith(": BadHttpMessage")  # the class, not the bytes


def test_aiohttp_is_the_version_the_malformed_http_hook_was_tested_with() -> None:
    """balancer/protocol.py overrides a handler method that aiohttp calls from a private
    path (public API cannot make its parse-error answer JSON): an upgrade must fail here
    until someone re-checks that path and moves the pin."""
    major, minor = protocol.TESTED_AIOHTTP
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pins = [d.split("#")[0].strip() for d in pyproject["project"]["dependencies"]
            if d.startswith("aiohttp")]
    assert pins == [f"aiohttp>={major}.{minor},<{major}.{minor + 1}"], (
        f"pyproject.toml must pin aiohttp to {major}.{minor}.x, the version "
        f"balancer/protocol.py was checked against (TESTED_AIOHTTP), not {pins}")
    assert protocol.aiohttp_version() == protocol.TESTED_AIOHTTP, (
        f"aiohttp {aiohttp.__version__} is installed but balancer/protocol.py was only "
        f"checked against {major}.{minor}: re-read the parse-error path its docstring "
        f"describes, then update TESTED_AIOHTTP and the pin in pyproject.toml")


async def test_errors_outside_the_middleware_keep_their_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    """Only parse errors (4xx) are quiet: a 5xx raised around the app is a gateway bug and
    keeps aiohttp's traceback at ERROR, but its answer is JSON too."""
    runner = protocol.GatewayRunner(web.Application(), access_log=None)
    await runner.setup()
    try:
        assert runner.server is not None
        handler = runner.server()
        assert isinstance(handler, web.RequestHandler)
        request = make_mocked_request("GET", "/", writer=mock.Mock(output_size=0))
        try:
            raise RuntimeError("bug")
        except RuntimeError as exc:
            response = handler.handle_error(request, 500, exc)
    finally:
        await runner.cleanup()
    assert response.status == 500 and response.content_type == "application/json"
    assert isinstance(response, web.Response) and response.body is not None
    assert json.loads(bytes(response.body))["error"]["type"] == "server_error"
    assert not response.keep_alive
    bugs = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(bugs) == 1 and bugs[0].levelno == logging.ERROR and bugs[0].exc_info


async def test_client_leaving_mid_body_is_no_server_error(
        stack: StackFactory, caplog: pytest.LogCaptureFixture) -> None:
    """A client that closed before sending its whole body raised ConnectionResetError
    out of the handler: a 500 and a traceback."""
    s = await stack(gateway_config({"a": 60_000}, body_timeout_seconds=1))
    caplog.set_level(logging.WARNING)
    for framing in (b"Content-Length: 500\r\n\r\n{\"model\"",
                    b"Transfer-Encoding: chunked\r\n\r\n10\r\n{\"model\": \"gpt-4\"\r\n"):
        with socket.create_connection(("127.0.0.1", port_of(s))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n" + framing)
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.2)
    # and broken chunked framing after the handler started reading (aiohttp queues the
    # parse error behind the request and leaves its body waiting: the body timeout ends it)
    with socket.create_connection(("127.0.0.1", port_of(s))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")
        await asyncio.sleep(0.2)
        sock.sendall(b"zz\r\n")
        sock.settimeout(5)
        reply = parse(await asyncio.to_thread(sock.recv, 65536), final=True)
    assert reply is not None and 400 <= reply.status < 500, reply
    assert not errors_logged(caplog), errors_logged(caplog)


async def test_slow_body_gets_408(stack: StackFactory) -> None:
    """Nothing bounded how long a client could take to send its body: a slowloris held
    a handler and a connection forever."""
    s = await stack(gateway_config({"a": 60_000}, body_timeout_seconds=0.5))
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, headers, body = await raw(s, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Type: application/json\r\n"
                                         b"Content-Length: 100\r\n\r\n{")
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert headers.get("connection", "").lower() == "close"
    assert 0.4 < loop.time() - started < 2


async def test_unknown_models_make_no_metric_series(stack: StackFactory) -> None:
    """Every made-up model name became a new labelled series in /metrics (and a log
    line): a client could grow the gateway's memory without bound."""
    s = await stack(gateway_config({"a": 60_000}))
    async with aiohttp.ClientSession() as session:
        for i in range(20):
            async with session.post(f"{s.url}/v1/chat/completions",
                                    json={**CHAT, "model": f"made-up-{i}"}) as r:
                assert r.status == 404
        async with session.get(f"{s.url}/metrics") as r:
            text = await r.text()
    assert "made-up" not in text
    assert 'balancer_client_rejections_total{reason="not_found"} 20.0' in text


@pytest.mark.parametrize("depth", [65, 500, 975, 5000])
async def test_deep_json_is_refused_before_any_region(stack: StackFactory, depth: int) -> None:
    """JSON nested a few hundred levels deep passed validation and was forwarded (and
    near Python's recursion limit the cost estimate could have raised)."""
    s = await stack(gateway_config({"a": 60_000}))
    deep = "[" * depth + "]" * depth
    data = json.dumps(CHAT)[:-1] + f', "tools": {deep}}}'
    status, _, body = await raw(s, request_bytes("POST", "/v1/chat/completions", JSON,
                                                 data.encode()))
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    assert await sim_calls(s) == 0


def test_depth_limit_allows_realistic_nesting() -> None:
    schema: dict = {"type": "string"}
    for _ in range(25):  # a tool schema 25 objects deep: 50 JSON levels
        schema = {"type": "object", "properties": {"x": schema}}
    body = {**CHAT, "tools": [{"type": "function", "function": {"name": "f",
                                                                 "parameters": schema}}]}
    assert validate.parse(CHAT_OP, json.dumps(body).encode(), None).model == "gpt-4"


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(constant: bytes) -> None:
    """Python's json accepts NaN and Infinity; JSON does not: they were forwarded."""
    raw = json.dumps(CHAT).encode()[:-1] + b', "temperature": ' + constant + b"}"
    with pytest.raises(ClientError) as info:
        validate.parse(CHAT_OP, raw, None)
    assert info.value.status == 400 and info.value.code == "invalid_json"


async def test_api_version_needs_ascii_digits(stack: StackFactory) -> None:
    """`\\d` also matches fullwidth and Arabic-Indic digits: such api-versions passed."""
    s = await stack(gateway_config({"a": 60_000}))
    async with aiohttp.ClientSession() as session:
        fullwidth = "".join(chr(0xFF10 + int(c)) if c.isdigit() else c for c in "2024-06-01")
        arabic = "".join(chr(0x0660 + int(c)) if c.isdigit() else c for c in "2024-06-01")
        for version in (fullwidth, arabic, "2024-06-01"):
            async with session.post(f"{s.url}/openai/deployments/gpt-4/chat/completions",
                                    params={"api-version": version},
                                    json={"messages": CHAT["messages"], "max_tokens": 5}) as r:
                assert r.status == (200 if version == "2024-06-01" else 400), version


async def test_content_type_must_be_json_when_given(stack: StackFactory) -> None:
    """An unparseable Content-Type ("json") or an explicit binary one was taken as JSON:
    aiohttp reports both as application/octet-stream, which was allowed for requests
    that send no Content-Type at all (still allowed)."""
    s = await stack(gateway_config({"a": 60_000}))
    body = json.dumps(CHAT).encode()
    for ctype, expected in ((b"json", 415), (b"application/octet-stream", 415),
                            (None, 200), (b"application/json; charset=utf-8", 200),
                            (b"application/vnd.api+json", 200)):
        headers = [] if ctype is None else [(b"Content-Type", ctype)]
        status, _, _ = await raw(s, request_bytes("POST", "/v1/chat/completions", headers,
                                                  body))
        assert status == expected, ctype


async def test_event_loop_lag_is_exported(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}))
    await asyncio.sleep(1.3)  # one measuring window
    async with aiohttp.ClientSession() as session, session.get(f"{s.url}/metrics") as r:
        text = await r.text()
    line = next(x for x in text.splitlines()
                if x.startswith("balancer_event_loop_lag_seconds "))
    assert 0 <= float(line.split()[1]) < 1
