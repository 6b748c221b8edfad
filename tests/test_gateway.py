"""The request path end to end: a real gateway in front of real simulated regions."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.conftest import Stack, StackFactory, gateway_config

CHAT = {"model": "gpt-4", "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 20}


async def post(url: str, body: Any, *, headers: dict[str, str] | None = None,
               raw: bytes | None = None) -> tuple[int, CIMultiDict[str], Any]:
    async with aiohttp.ClientSession() as s:
        data = raw if raw is not None else json.dumps(body).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        async with s.post(url, data=data, headers=h) as r:
            text = await r.text()
            try:
                payload = json.loads(text)
            except ValueError:
                payload = text
            return r.status, CIMultiDict(r.headers), payload


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        text = await r.text()
        return r.status, (json.loads(text) if r.content_type == "application/json" else text)


async def stream_events(url: str, body: Any) -> tuple[int, CIMultiDict[str], list[Any]]:
    events: list[Any] = []
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        async for line in r.content:
            line = line.strip()
            if line.startswith(b"data: "):
                data = line[6:]
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
        return r.status, CIMultiDict(r.headers), events


async def regions_of(stack: Stack, model: str = "gpt-4") -> dict[str, dict[str, Any]]:
    status, body = await get(f"{stack.url}/regions")
    assert status == 200
    return {row["region"]: row for row in body["models"][model]}


def assert_openai_error(status: int, payload: Any, expected_status: int, code: str | None = None
                        ) -> None:
    assert status == expected_status, payload
    assert isinstance(payload, dict) and set(payload["error"]) >= {"message", "type", "code"}
    if code:
        assert payload["error"]["code"] == code


async def test_chat_openai_shape(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000, "b": 60_000}))
    status, headers, body = await post(f"{s.url}/v1/chat/completions", CHAT,
                                       headers={"x-request-id": "req-123"})
    assert status == 200, body
    assert headers["x-balancer-region"] in ("a", "b")
    assert headers["x-request-id"] == "req-123"
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] <= 20
    stats = await s.sim_stats()
    assert sum(d["admitted"] for r in stats.values() for d in r.values()) == 1


async def test_azure_shape_and_embeddings(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}))
    url = f"{s.url}/openai/deployments/gpt-4/chat/completions?api-version=2024-06-01"
    status, headers, body = await post(url, {"messages": CHAT["messages"], "max_tokens": 5})
    assert status == 200 and body["object"] == "chat.completion"
    assert len(headers["x-request-id"]) == 32  # generated when the client sends none
    url = f"{s.url}/openai/deployments/emb/embeddings?api-version=2024-06-01"
    status, _, body = await post(url, {"input": ["one", "two"]})
    assert status == 200 and len(body["data"]) == 2
    status, _, body = await post(f"{s.url}/v1/embeddings", {"model": "emb", "input": "hi"})
    assert status == 200 and body["object"] == "list"
    status, _, body = await post(f"{s.url}/v1/completions",
                                 {"model": "gpt-4", "prompt": "Once", "max_tokens": 4})
    assert status == 200 and body["object"] == "text_completion"


async def test_stream_relays_and_settles(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}, time_scale=1e-9))  # no refill: exact sums
    body = {**CHAT, "stream": True, "max_tokens": 40}
    status, headers, events = await stream_events(f"{s.url}/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if e != "[DONE]"]
    assert all(c["choices"] for c in chunks), "the usage chunk the client did not ask for leaked"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text
    # the client asks for usage itself: it gets the usage chunk
    body["stream_options"] = {"include_usage": True}
    status, _, events = await stream_events(f"{s.url}/v1/chat/completions", body)
    usage_chunks = [e for e in events if e != "[DONE]" and e.get("usage")]
    assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
    # both streams settled on real usage: the bucket holds capacity minus what the
    # region's quota counter charged (real prompt + max_tokens), nothing reserved in flight.
    row = (await regions_of(s))["a"]
    charged = sum(d["admitted_tokens"] for d in (await s.sim_stats())["a"].values())
    assert row["tokens_capacity"] - row["tokens_remaining"] == pytest.approx(charged, abs=2)


async def test_429_cools_region_down_and_retries_elsewhere(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000, "b": 60_000}))
    # a hidden consumer the gateway cannot see empties region a's quota
    await s.knobs("a", latency_per_token_ms=0)
    status, _, _ = await post(f"{s.sim_url}/a/openai/deployments/gpt-4-dep/chat/completions"
                              "?api-version=2024-06-01", {**CHAT, "max_tokens": 100_000},
                              headers={"api-key": "sim-key-a"})
    assert status == 200
    regions = []
    for _ in range(40):  # until a is picked (1 in 2 each time) and refuses
        status, headers, body = await post(f"{s.url}/v1/chat/completions", CHAT)
        assert status == 200, body
        regions.append(headers["x-balancer-region"])
        if (await s.sim_stats())["a"]["gpt-4-dep"]["throttled"]:
            break
    for _ in range(3):  # then a cools down: b serves, a is not asked again
        status, headers, body = await post(f"{s.url}/v1/chat/completions", CHAT)
        assert status == 200, body
        regions.append(headers["x-balancer-region"])
    assert set(regions) == {"b"}
    stats = await s.sim_stats()
    assert stats["a"]["gpt-4-dep"]["throttled"] == 1  # once, then a cools down
    row = (await regions_of(s))["a"]
    assert row["cooldown_seconds"] > 0 and row["tokens_remaining"] < row["tokens_capacity"]


async def test_5xx_opens_circuit_and_clients_see_no_error(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 600_000, "b": 600_000}, circuit_failures=2,
                                   circuit_open_seconds=30))
    await s.knobs("a", fail_rate=1.0)
    for _ in range(20):
        status, _, body = await post(f"{s.url}/v1/chat/completions", CHAT)
        assert status == 200, body
    row = (await regions_of(s))["a"]
    assert row["circuit"] == "open"
    assert (await s.sim_stats())["a"]["gpt-4-dep"]["failed"] == 2


async def test_hanging_region_times_out_and_retries(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000, "b": 60_000}, read_timeout_seconds=0.5))
    await s.knobs("a", hang=True)
    loop = asyncio.get_running_loop()
    for _ in range(4):
        started = loop.time()
        status, headers, body = await post(f"{s.url}/v1/chat/completions", CHAT)
        assert status == 200 and headers["x-balancer-region"] == "b", body
        assert loop.time() - started < 2.0


async def test_stream_reset_mid_way_ends_with_error_event(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}))
    await s.knobs("a", reset_after_chunks=2)
    status, _, events = await stream_events(f"{s.url}/v1/chat/completions",
                                            {**CHAT, "stream": True, "max_tokens": 50})
    assert status == 200
    assert "error" in events[-1] and events[-1]["error"]["code"] == "stream_broken"
    assert len(events) >= 2  # chunks before the reset were relayed


async def test_all_exhausted_gives_429_with_retry_after(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 6_000}))  # bucket: 1,000 tokens
    body = {**CHAT, "max_tokens": 600}
    first, _, _ = await post(f"{s.url}/v1/chat/completions", body)
    assert first == 200
    status, headers, payload = await post(f"{s.url}/v1/chat/completions", body)
    assert_openai_error(status, payload, 429, "rate_limit_exceeded")
    assert 1 <= int(headers["Retry-After"]) <= 7  # ~600 tokens at 100 tokens/s
    assert (await s.sim_stats())["a"]["gpt-4-dep"]["throttled"] == 0


async def test_fallback_tier_only_when_primary_exhausted(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 6_000}, fallback=60_000))
    body = {**CHAT, "max_tokens": 600}
    _, h1, _ = await post(f"{s.url}/v1/chat/completions", body)
    _, h2, b2 = await post(f"{s.url}/v1/chat/completions", body)
    assert h1["x-balancer-region"] == "a"
    assert h2["x-balancer-region"] == "fallback", b2  # openai kind: Bearer auth, model rewritten
    assert (await s.sim_stats())["fallback"]["gpt-4-oai"]["admitted"] == 1


async def test_client_keys(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}), api_keys=(b"client-key-1", b"client-key-2"))
    url = f"{s.url}/v1/chat/completions"
    status, _, payload = await post(url, CHAT)
    assert_openai_error(status, payload, 401, "invalid_api_key")
    status, _, payload = await post(url, CHAT, headers={"Authorization": "Bearer nope"})
    assert_openai_error(status, payload, 401, "invalid_api_key")
    status, _, _ = await post(url, CHAT, headers={"Authorization": "Bearer client-key-2"})
    assert status == 200  # the simulator checks its own key: the client's is not forwarded
    status, _, _ = await post(url, CHAT, headers={"api-key": "client-key-1"})
    assert status == 200
    status, _ = await get(f"{s.url}/regions")
    assert status == 401
    status, _ = await get(f"{s.url}/healthz")
    assert status == 200


@pytest.mark.parametrize("path, raw, headers, status, code", [
    ("/v1/chat/completions", b"{not json", {}, 400, "invalid_json"),
    ("/v1/chat/completions", b'{"model": "gpt-4"', {}, 400, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", {}, 400, "invalid_json"),
    ("/v1/chat/completions", b"", {}, 400, "invalid_json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', {}, 400,
     "missing_required_parameter"),
    ("/v1/chat/completions", b'{"model": 5, "messages": []}', {}, 400, "invalid_type"),
    ("/v1/chat/completions", b'{"model": "gpt-4", "messages": "hi"}', {}, 400, None),
    ("/v1/chat/completions", b'{"model": "gpt-4", "messages": [{"role": "user"}],'
     b' "max_tokens": -1}', {}, 400, None),
    ("/v1/chat/completions", b'{"model": "gpt-4", "messages": [{"role": "user"}],'
     b' "max_tokens": "10"}', {}, 400, None),
    ("/v1/chat/completions", b'{"model": "gpt-4", "messages": [{"role": "user"}],'
     b' "stream": "yes"}', {}, 400, "invalid_type"),
    ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user"}]}', {}, 404,
     "model_not_found"),
    ("/v1/embeddings", b'{"model": "emb", "input": ""}', {}, 400, None),
    ("/v1/embeddings", b'{"model": "emb", "input": [{"a": 1}]}', {}, 400, None),
    ("/v1/completions", b'{"model": "gpt-4"}', {}, 400, None),
    ("/v1/chat/completions", b'{"model": "gpt-4"}', {"Content-Type": "text/plain"}, 415, None),
    ("/openai/deployments/gpt-4/chat/completions", b"{}", {}, 400, "missing_api_version"),
    ("/openai/deployments/gpt-4/chat/completions?api-version=latest", b"{}", {}, 400,
     "invalid_api_version"),
    ("/openai/deployments/..%2F..%2Fetc/chat/completions?api-version=2024-06-01",
     b'{"messages": [{"role": "user"}]}', {}, 404, None),
    ("/v1/unknown", b"{}", {}, 404, "not_found"),
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, {}, 400, "invalid_json"),
])
async def test_bad_input_gets_openai_shaped_4xx(stack: StackFactory, path: str, raw: bytes,
                                                headers: dict[str, str], status: int,
                                                code: str | None) -> None:
    s = await stack(gateway_config({"a": 60_000}))
    got, _, payload = await post(f"{s.url}{path}", None, raw=raw, headers=headers)
    assert_openai_error(got, payload, status, code)
    assert (await get(f"{s.url}/healthz"))[0] == 200


async def test_oversized_body_is_413(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}, max_body_bytes=4096))
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
    status, _, payload = await post(f"{s.url}/v1/chat/completions", body)
    assert_openai_error(status, payload, 413, "request_too_large")


async def test_wrong_method_is_openai_shaped(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}))
    status, payload = await get(f"{s.url}/v1/chat/completions")
    assert_openai_error(status, payload, 405, "method_not_allowed")


async def test_info_routes(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000, "b": 12_000}))
    await post(f"{s.url}/v1/chat/completions", CHAT)
    status, models = await get(f"{s.url}/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["emb", "gpt-4"]
    assert (await get(f"{s.url}/readyz")) == (200, {"status": "ready", "store": "memory",
                                                    "degraded": False})
    rows = await regions_of(s)
    assert rows["b"]["tokens_capacity"] == 2000.0 and rows["b"]["circuit"] == "closed"
    status, body = await get(f"{s.url}/regions")
    assert "sim-key" not in json.dumps(body) and s.sim_url not in json.dumps(body)
    status, text = await get(f"{s.url}/metrics")
    assert status == 200
    for name in ("balancer_requests_total", "balancer_upstream_latency_seconds_bucket",
                 "balancer_upstream_throttled_total", "balancer_tokens_total",
                 "balancer_remaining_tokens"):
        assert name in text
    assert 'balancer_requests_total{model="gpt-4",operation="chat/completions",region=' in text
    assert "sim-key" not in text
