"""Security: client keys compared in constant time; a client cannot pick the upstream
URL or key, nor read /regions without a key (or at all, when switched off); and a whole
load-and-fault session with real secrets set leaks none of them into a log line, an
error body, /metrics or /regions."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from balancer import config as config_mod
from balancer.errors import ClientError
from balancer.gateway import RUNTIME, clients, create_app
from balancer.protocol import GatewayRunner
from tests.conftest import StackFactory, free_port, gateway_config
from tests.faults.harness import (
    Rig,
    Row,
    config_text,
    get_json,
    get_text,
    knobs,
    record,
    run_load,
)
from tests.faults.rawhttp import exchange, request_bytes

CHAT = {"model": "gpt-4", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


# --------------------------------------------------------------------------- constant time


def test_client_keys_are_compared_in_constant_time(
        digest_comparisons: list[tuple[int, int]]) -> None:
    """Every configured key is compared, whatever matched, and every comparison is
    between two SHA-256 digests: its time depends on neither the keys' contents nor their
    lengths (hmac.compare_digest leaks the length of unequal-length inputs)."""
    keys = (b"first-key", b"a-much-longer-second-client-key-0123456789", b"k3")
    app = create_app(gateway_config({"a": 60_000}), api_keys=keys)
    rt = app[RUNTIME]
    calls = digest_comparisons
    cases: list[tuple[dict[str, str], bool]] = [
        ({"api-key": "first-key"}, True), ({"Authorization": "Bearer k3"}, True),
        ({"api-key": keys[1].decode()}, True), ({"api-key": "first-kez"}, False),
        ({"api-key": "f"}, False), ({"api-key": "x" * 5000}, False), ({}, False),
    ]
    for headers, allowed in cases:
        calls.clear()
        request = make_mocked_request("POST", "/v1/chat/completions", headers=headers)
        try:
            clients.authorize(request, rt)
            ok = True
        except ClientError as exc:
            assert exc.status == 401
            ok = False
        assert ok is allowed, headers
        assert calls == [(32, 32)] * len(keys), (headers, calls)
    assert hashlib.sha256(b"k3").digest() in clients.digests(keys)


async def test_non_utf8_key_is_a_wrong_key_not_a_500(stack: StackFactory) -> None:
    """Regression: a key header with bytes that are not UTF-8 raised UnicodeEncodeError
    in the comparison, a 500 with a traceback."""
    s = await stack(gateway_config({"a": 60_000}), api_keys=(b"k1",))
    port = int(s.url.rsplit(":", 1)[1])
    for header in (b"api-key", b"Authorization"):
        value = b"\xff\xfe" if header == b"api-key" else b"Bearer \xc3\x28"
        reply = await asyncio.to_thread(exchange, port, request_bytes(
            "POST", "/v1/chat/completions", [(b"Content-Type", b"application/json"),
                                             (header, value)], json.dumps(CHAT).encode()))
        assert reply.status == 401, reply
        assert json.loads(reply.body)["error"]["code"] == "invalid_api_key"


# --------------------------------------------------------------------------- upstream choice


class Capture:
    """A fake Azure region that records what reaches it, and a decoy that must not."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.decoy_hits = 0

    async def region(self, request: web.Request) -> web.Response:
        self.seen.append({"path": request.path, "query": dict(request.query),
                          "headers": dict(request.headers), "body": await request.read()})
        return web.json_response({
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    async def decoy(self, request: web.Request) -> web.Response:
        self.decoy_hits += 1
        return web.json_response({"error": {"message": "decoy", "type": "x", "code": "x"}})


async def _serve(handler: Any) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.fixture
async def capture() -> AsyncIterator[tuple[Capture, int, int]]:
    c = Capture()
    runners = []
    region_runner, region_port = await _serve(c.region)
    decoy_runner, decoy_port = await _serve(c.decoy)
    runners += [region_runner, decoy_runner]
    yield c, region_port, decoy_port
    for r in runners:
        await r.cleanup()


async def test_client_cannot_choose_upstream_url_or_key(
        capture: tuple[Capture, int, int]) -> None:
    c, region_port, decoy_port = capture
    decoy = f"127.0.0.1:{decoy_port}"
    cfg = config_mod.parse(f"""
regions:
  - name: a
    kind: azure
    endpoint: http://127.0.0.1:{region_port}
    api_key: the-real-region-key
    api_version: "2024-06-01"
    deployments:
      gpt-4: {{deployment: configured-deployment, tpm: 600000}}
""", "test.yaml", {})
    runner = GatewayRunner(create_app(cfg, api_keys=()), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        hostile_headers = {
            "api-key": "attacker-key", "Authorization": "Bearer attacker-key",
            "Host": decoy, "X-Forwarded-Host": decoy, "X-Forwarded-Proto": "https",
            "Forwarded": f"host={decoy}", "X-Original-URL": f"http://{decoy}/x",
            "X-Rewrite-URL": f"http://{decoy}/x", "Cookie": "session=attacker",
            "x-ms-region": "decoy", "x-balancer-region": "decoy"}
        body = {**CHAT, "base_url": f"http://{decoy}", "azure_endpoint": f"http://{decoy}",
                "api_base": f"http://{decoy}", "endpoint": f"http://{decoy}"}
        urls = [f"/v1/chat/completions?api-version=1999-01-01&endpoint=http://{decoy}",
                "/openai/deployments/gpt-4/chat/completions?api-version=2023-05-15"
                f"&base_url=http://{decoy}"]
        async with aiohttp.ClientSession() as s:
            for path in urls:
                async with s.post(f"http://127.0.0.1:{port}{path}", json=body,
                                  headers=hostile_headers) as r:
                    assert r.status == 200, await r.text()
            # a deployment segment naming the decoy is just an unknown model
            async with s.post(f"http://127.0.0.1:{port}/openai/deployments/{decoy}/chat/"
                              "completions?api-version=2024-06-01", json=CHAT) as r:
                assert r.status == 404
        # absolute-form request target naming the decoy
        reply = await asyncio.to_thread(exchange, port, request_bytes(
            "POST", f"http://{decoy}/v1/chat/completions",
            [(b"Content-Type", b"application/json")], json.dumps(CHAT).encode()))
        assert reply.status == 200
    finally:
        await runner.cleanup()
    assert c.decoy_hits == 0
    assert len(c.seen) == 3
    for seen in c.seen:
        assert seen["path"] == "/openai/deployments/configured-deployment/chat/completions"
        assert seen["query"] == {"api-version": "2024-06-01"}
        headers = {k.lower(): v for k, v in seen["headers"].items()}
        assert headers["api-key"] == "the-real-region-key"
        assert headers["host"] == f"127.0.0.1:{region_port}"
        for name in ("authorization", "cookie", "x-forwarded-host", "forwarded",
                     "x-original-url", "x-rewrite-url", "x-ms-region", "x-balancer-region"):
            assert name not in headers, name


async def test_regions_and_admin_data_need_a_key(stack: StackFactory) -> None:
    key = "client-key-regions"
    s = await stack(gateway_config({"a": 60_000}), api_keys=(key.encode(),))
    async with aiohttp.ClientSession() as session:
        async def get(path: str, **headers: str) -> tuple[int, str]:
            async with session.get(f"{s.url}{path}", headers=headers) as r:
                return r.status, await r.text()

        assert (await get("/regions"))[0] == 401
        assert (await get("/regions", **{"api-key": "wrong"}))[0] == 401
        assert (await get("/v1/models"))[0] == 401
        status, text = await get("/regions", **{"api-key": key})
        assert status == 200
        for private in ("sim-key", s.sim_url, "127.0.0.1", "endpoint", "api_key"):
            assert private not in text, private
        for path in ("/metrics", "/readyz", "/healthz"):  # open, and free of private data
            status, text = await get(path)
            assert status == 200 and "sim-key" not in text and s.sim_url not in text
        for path in ("/_sim/stats", "/admin", "/debug", "/config", "/regions.yaml", "/env"):
            assert (await get(path, **{"api-key": key}))[0] == 404, path

    hidden = await stack(gateway_config({"a": 60_000}, expose_regions=False),
                         api_keys=(key.encode(),))
    async with aiohttp.ClientSession() as session, session.get(
            f"{hidden.url}/regions", headers={"api-key": key}) as r:
        assert r.status == 404


# --------------------------------------------------------------------------- key leaks


@pytest.mark.slow
async def test_no_secret_leaks_under_load_and_faults(rig: Rig) -> None:
    """Real upstream keys, client keys and a Redis password set; a load with every kind
    of fault and hostile request; then every log line, every answer body, /metrics,
    /regions, /readyz and /v1/models are searched for each secret."""
    region_key = "sk-region-" + secrets.token_hex(16)
    client_key = "ck-client-" + secrets.token_hex(16)
    redis_pw = "rp-redis-" + secrets.token_hex(16)
    rig.start(config_text(circuit_open_seconds=1),
              redis_args=("--requirepass", redis_pw), log_level="DEBUG",
              env={"REGION_KEY": region_key, "BALANCER_API_KEYS": client_key},
              store_url=f"redis://:{redis_pw}@127.0.0.1:{{port}}/0")
    for url in rig.urls:  # authenticated to Redis with the password: shared mode
        assert (await get_json(f"{url}/readyz"))["degraded"] is False
    bodies: list[str] = []
    secrets_ = {"region key": region_key, "client key": client_key, "redis password": redis_pw}

    async def faults() -> None:
        steps: list[dict[str, Any]] = [{"fail_rate": 1.0}, {"fail_rate": 0.0, "hang": True},
                                       {"hang": False, "reset_after_chunks": 2},
                                       {"reset_after_chunks": None, "malformed": "html"},
                                       {"malformed": "json"}, {"malformed": None}]
        for step in steps:
            await knobs(rig, "a", **step)
            await asyncio.sleep(0.8)
        await asyncio.to_thread(rig.kill_redis)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(rig.restart_redis)

    async def hostile() -> None:
        # The secrets themselves offered back as client keys, and other wrong keys.
        async with aiohttp.ClientSession() as s:
            for key in (region_key, redis_pw, client_key[:-1], client_key.upper(), ""):
                for header in ("api-key", "Authorization"):
                    value = key if header == "api-key" else f"Bearer {key}"
                    async with s.post(f"{rig.urls[0]}/v1/chat/completions", json=CHAT,
                                      headers={header: value}) as r:
                        assert r.status == 401
                        bodies.append(await r.text())
            async with s.post(f"{rig.urls[1]}/v1/chat/completions", data=b"{bad",
                              headers={"api-key": client_key}) as r:
                bodies.append(await r.text())

    load = asyncio.create_task(run_load(rig.urls, rate=30, seconds=8, seed=21,
                                        stream_fraction=0.4, api_key=client_key))
    await asyncio.gather(faults(), hostile())
    outcomes = await load
    bodies += [o.body for o in outcomes]
    outputs = []
    auth = {"api-key": client_key}
    for url in rig.urls:
        outputs += [await get_text(f"{url}/metrics"), await get_text(f"{url}/readyz"),
                    json.dumps(await get_json(f"{url}/regions", headers=auth)),
                    json.dumps(await get_json(f"{url}/v1/models", headers=auth))]
    for gw in rig.gateways:
        gw.proc.terminate()  # so the logs are complete, shutdown lines included
        gw.proc.wait(15)
    logs = {g.name: rig.log(g) for g in rig.gateways}
    lines = sum(text.count("\n") for text in logs.values())
    found = [f"{what} in {where}" for what, value in secrets_.items()
             for where, text in [*logs.items(), ("answer bodies", "\n".join(bodies)),
                                 ("/metrics, /readyz, /regions, /v1/models", "\n".join(outputs))]
             if value in text]
    statuses = sorted({o.status for o in outcomes})
    cut = [o for o in outcomes if o.failed]
    assert all(o.end == "error_event" for o in cut), cut[:3]  # only the stream resets
    record(Row("security", "Secret scan after a load + fault session (DEBUG logs)",
               "30 rps for 8 s, 2 replicas", len(outcomes), len(cut),
               f"{len(cut)}: streams cut by the reset fault; 0 secrets found", len(found),
               f"searched {lines} log lines, {len(bodies)} answer bodies and "
               f"{len(outputs)} /metrics, /readyz, /regions, /v1/models outputs for the "
               f"region key, client key and Redis password: {len(found)} found; "
               f"statuses seen {statuses}",
               {"found": found, "log_lines": lines, "at": time.time()}))
    assert lines > 200  # DEBUG logs: the search had something to look at
    assert not found, found
