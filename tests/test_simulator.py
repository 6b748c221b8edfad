"""The simulator over real HTTP: shapes, auth, admission, streaming, faults, control, SDKs."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from balancer import sim
from balancer.operations import OPERATIONS
from balancer.sim import SimConfig, SimDeployment, SimRegion, create_app

CHAT_OP = OPERATIONS["chat/completions"]

AZURE_CHAT = "/eastus2/openai/deployments/gpt-4/chat/completions?api-version=2024-06-01"
OPENAI_CHAT = "/eastus2/v1/chat/completions"
KEY = "secret"
CHAT = {"messages": [{"role": "user", "content": "Say hello to the simulator."}], "max_tokens": 40}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def region(
    name: str = "eastus2", tpm: int = 100_000, rpm: int | None = None, **knobs: Any
) -> SimRegion:
    knobs = {"api_key": KEY, "latency_base_ms": 0.0, "latency_per_token_ms": 0.0, **knobs}
    return SimRegion(name, [SimDeployment("gpt-4", tpm, rpm)], **knobs)


def config(*regions: SimRegion, **options: Any) -> SimConfig:
    return SimConfig(list(regions) or [region()], seed=7, **options)


@pytest.fixture
async def make_client(aiohttp_client: Any):
    async def make(cfg: SimConfig | None = None, clock: FakeClock | None = None) -> Any:
        app = create_app(cfg or config(), clock=clock or time.monotonic)
        return await aiohttp_client(app)

    return make


def headers(shape: str = "azure", key: str = KEY) -> dict[str, str]:
    return {"api-key": key} if shape == "azure" else {"Authorization": f"Bearer {key}"}


def url(shape: str, op: str = "chat/completions", deployment: str = "gpt-4") -> str:
    if shape == "azure":
        return f"/eastus2/openai/deployments/{deployment}/{op}?api-version=2024-06-01"
    return f"/eastus2/v1/{op}"


def body_for(shape: str, body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "model": "gpt-4"} if shape == "openai" else body


async def post(client: Any, shape: str, op: str, body: dict[str, Any], **kw: Any) -> Any:
    return await client.post(
        url(shape, op), json=body_for(shape, body), headers=headers(shape), **kw
    )


async def sse_events(resp: aiohttp.ClientResponse) -> list[Any]:
    """The data payloads of an event stream, `[DONE]` as the string."""
    events = []
    async for line in resp.content:
        text = line.decode().strip()
        if text.startswith("data: "):
            data = text.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def stats(client: Any, region_name: str = "eastus2") -> dict[str, Any]:
    resp = await client.get("/_sim/stats")
    return (await resp.json())["regions"][region_name]["gpt-4"]


# --- shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["azure", "openai"])
async def test_chat_completion_shape_and_usage(make_client: Any, shape: str) -> None:
    client = await make_client()
    resp = await post(client, shape, "chat/completions", CHAT)
    assert resp.status == 200
    assert resp.headers["x-sim-region"] == "eastus2"
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) >= 0
    assert int(resp.headers["x-ratelimit-remaining-requests"]) >= 0
    data = await resp.json()
    assert data["object"] == "chat.completion" and data["model"] == "gpt-4"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in (
        "stop",
        "length",
    )
    usage = data["usage"]
    assert usage["prompt_tokens"] == CHAT_OP.prompt_tokens(CHAT)
    assert 20 <= usage["completion_tokens"] <= 40  # completion_fraction (0.5, 1.0) of max_tokens
    assert len(choice["message"]["content"].split()) == usage["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("shape", ["azure", "openai"])
async def test_completions_shape(make_client: Any, shape: str) -> None:
    client = await make_client()
    body = {"prompt": "Once upon a time", "max_tokens": 10, "n": 2}
    data = await (await post(client, shape, "completions", body)).json()
    assert data["object"] == "text_completion"
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert all(c["logprobs"] is None and c["finish_reason"] for c in data["choices"])
    words = sum(len(c["text"].split()) for c in data["choices"])
    assert data["usage"]["completion_tokens"] == words
    assert data["usage"]["prompt_tokens"] == OPERATIONS["completions"].prompt_tokens(body)


@pytest.mark.parametrize("shape", ["azure", "openai"])
async def test_embeddings_shape(make_client: Any, shape: str) -> None:
    client = await make_client()
    body = {"input": ["first text", "second", "a third text here"]}
    resp = await post(client, shape, "embeddings", body)
    data = await resp.json()
    assert data["object"] == "list"
    assert [d["index"] for d in data["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in data["data"])
    tokens = OPERATIONS["embeddings"].prompt_tokens(body)
    assert data["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert (await stats(client))["admitted_tokens"] == tokens  # embeddings cost prompt only


# --- auth and routing -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["azure", "openai"])
@pytest.mark.parametrize("key", [None, "wrong"])
async def test_bad_key_is_401(make_client: Any, shape: str, key: str | None) -> None:
    client = await make_client()
    sent = {} if key is None else headers(shape, key)
    resp = await client.post(url(shape), json=body_for(shape, CHAT), headers=sent)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "401"


async def test_region_without_key_accepts_any_key(make_client: Any) -> None:
    client = await make_client(config(region(api_key=None)))
    assert (await client.post(AZURE_CHAT, json=CHAT, headers={"api-key": "anything"})).status == 200


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/nowhere/v1/chat/completions", 404),
        ("/eastus2/openai/deployments/gpt-5/chat/completions?api-version=2024-06-01", 404),
        ("/eastus2/openai/deployments/gpt-4/chat/completions", 404),  # no api-version
    ],
)
async def test_unknown_targets_are_openai_shaped_404(
    make_client: Any, path: str, status: int
) -> None:
    client = await make_client()
    resp = await client.post(path, json=CHAT, headers={**headers("azure"), **headers("openai")})
    assert resp.status == status
    assert set((await resp.json())["error"]) >= {"message", "type", "code"}


async def test_openai_shape_unknown_model_and_bad_json(make_client: Any) -> None:
    client = await make_client()
    resp = await client.post(
        OPENAI_CHAT, json={**CHAT, "model": "gpt-5"}, headers=headers("openai")
    )
    assert resp.status == 404
    resp = await client.post(OPENAI_CHAT, json=CHAT, headers=headers("openai"))  # no model
    assert resp.status == 400
    resp = await client.post(OPENAI_CHAT, data=b"{not json", headers=headers("openai"))
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_json"
    resp = await client.post(AZURE_CHAT, json={"messages": []}, headers=headers())
    assert resp.status == 400


# --- admission ------------------------------------------------------------------------------


async def test_token_limit_429_then_refill(make_client: Any) -> None:
    clock = FakeClock()
    # 600 TPM over a 10 s window: a 100-token bucket refilling 10 tokens/s
    client = await make_client(config(region(tpm=600, rpm=6000)), clock)
    body = {**CHAT, "max_tokens": 50}
    charge = CHAT_OP.prompt_tokens(body) + 50
    first = await client.post(AZURE_CHAT, json=body, headers=headers())
    assert first.status == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == str(100 - charge)

    second = await client.post(AZURE_CHAT, json=body, headers=headers())
    assert second.status == 429
    wait = (charge - (100 - charge)) / 10
    assert second.headers["retry-after"] == str(max(1, -(-int(wait * 1000) // 1000)))
    assert int(second.headers["retry-after-ms"]) == pytest.approx(wait * 1000, abs=1)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(100 - charge)
    error = (await second.json())["error"]
    assert error["code"] == "429" and "token rate limit" in error["message"]

    clock.now += wait - 0.01
    assert (await client.post(AZURE_CHAT, json=body, headers=headers())).status == 429
    clock.now += 0.02
    assert (await client.post(AZURE_CHAT, json=body, headers=headers())).status == 200
    s = await stats(client)
    assert (s["admitted"], s["throttled"], s["admitted_tokens"]) == (2, 2, 2 * charge)
    assert s["peak_window_tokens"] == 2 * charge


async def test_request_limit_429(make_client: Any) -> None:
    clock = FakeClock()
    client = await make_client(config(region(rpm=60)), clock)  # one request per second
    assert (await client.post(AZURE_CHAT, json=CHAT, headers=headers())).status == 200
    resp = await client.post(AZURE_CHAT, json=CHAT, headers=headers())
    assert resp.status == 429
    assert resp.headers["retry-after"] == "1" and resp.headers["retry-after-ms"] == "1000"
    assert "call rate limit" in (await resp.json())["error"]["message"]
    clock.now += 1
    assert (await client.post(AZURE_CHAT, json=CHAT, headers=headers())).status == 200


async def test_time_scale_shortens_real_waits(make_client: Any) -> None:
    # time_scale 60: a simulated minute is one real second, so retry-after-ms is tiny
    client = await make_client(config(region(tpm=600, rpm=6000), time_scale=60))
    body = {**CHAT, "max_tokens": 90}
    assert (await client.post(AZURE_CHAT, json=body, headers=headers())).status == 200
    resp = await client.post(AZURE_CHAT, json=body, headers=headers())
    assert resp.status == 429
    assert resp.headers["retry-after"] == "1"
    wait_ms = int(resp.headers["retry-after-ms"])
    assert 0 < wait_ms < 200
    await asyncio.sleep(wait_ms / 1000 + 0.02)
    assert (await client.post(AZURE_CHAT, json=body, headers=headers())).status == 200


async def test_oversized_request_needs_full_bucket_and_overdraws(make_client: Any) -> None:
    clock = FakeClock()
    client = await make_client(config(region(tpm=600, rpm=6000)), clock)
    big = {**CHAT, "max_tokens": 250}  # more than the 100-token bucket
    resp = await client.post(AZURE_CHAT, json=big, headers=headers())
    assert resp.status == 200 and resp.headers["x-ratelimit-remaining-tokens"] == "0"
    assert (await stats(client))["tokens_available"] < -150
    resp = await client.post(AZURE_CHAT, json={**CHAT, "max_tokens": 1}, headers=headers())
    assert resp.status == 429


async def test_cotenant_drains_the_bucket(make_client: Any) -> None:
    clock = FakeClock()
    client = await make_client(config(region(tpm=600, rpm=6000, cotenant_tpm=300)), clock)
    await client.post(AZURE_CHAT, json={**CHAT, "max_tokens": 80}, headers=headers())
    before = (await stats(client))["tokens_available"]
    clock.now += 2
    after = (await stats(client))["tokens_available"]
    assert after - before == pytest.approx(2 * (10 - 5))  # refill 10/s, co-tenant takes 5/s


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream(make_client: Any, include_usage: bool) -> None:
    client = await make_client()
    body: dict[str, Any] = {**CHAT, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    resp = await client.post(AZURE_CHAT, json=body, headers=headers())
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    assert "x-ratelimit-remaining-tokens" in resp.headers
    events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    completion = (await stats(client))["completion_tokens"]
    assert len(text.split()) == completion
    if include_usage:
        *content, final = chunks
        assert all(c["usage"] is None for c in content)
        assert final["choices"] == []
        assert final["usage"]["completion_tokens"] == completion
        assert final["usage"]["prompt_tokens"] == CHAT_OP.prompt_tokens(body)
        assert content[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert all("usage" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_completions_stream(make_client: Any) -> None:
    client = await make_client()
    body = {
        "prompt": "hi",
        "max_tokens": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = await sse_events(await post(client, "openai", "completions", body))
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert len(text.split()) == chunks[-1]["usage"]["completion_tokens"]


async def test_stream_latency_spreads_over_chunks(make_client: Any) -> None:
    client = await make_client(config(region(latency_base_ms=50, latency_per_token_ms=5)))
    started = time.monotonic()
    resp = await client.post(
        AZURE_CHAT, json={**CHAT, "stream": True, "max_tokens": 20}, headers=headers()
    )
    first_byte = time.monotonic() - started
    await sse_events(resp)
    total = time.monotonic() - started
    tokens = (await stats(client))["completion_tokens"]
    assert first_byte >= 0.05
    assert total >= 0.05 + tokens * 0.005 - 0.01


# --- faults ---------------------------------------------------------------------------------


async def test_fail_rate_answers_fail_status_without_charging(make_client: Any) -> None:
    client = await make_client(config(region(fail_rate=1.0, fail_status=503)))
    resp = await client.post(AZURE_CHAT, json=CHAT, headers=headers())
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "503"
    s = await stats(client)
    assert (s["failed"], s["admitted"], s["admitted_tokens"]) == (1, 0, 0)


async def test_malformed_json_and_html(make_client: Any) -> None:
    client = await make_client(config(region(malformed="json")))
    resp = await client.post(AZURE_CHAT, json=CHAT, headers=headers())
    assert resp.status == 200 and resp.content_type == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(await resp.text())
    await client.post("/_sim/regions/eastus2", json={"malformed": "html"})
    resp = await client.post(AZURE_CHAT, json=CHAT, headers=headers())
    assert resp.status == 502 and resp.content_type == "text/html"


async def test_throttle_headers_none_and_minus1(make_client: Any) -> None:
    clock = FakeClock()
    client = await make_client(config(region(rpm=60, throttle_headers="none")), clock)
    ok = await client.post(AZURE_CHAT, json=CHAT, headers=headers())
    throttled = await client.post(AZURE_CHAT, json=CHAT, headers=headers())
    assert (ok.status, throttled.status) == (200, 429)
    for resp in (ok, throttled):
        assert not any(h.startswith(("x-ratelimit", "retry-after")) for h in resp.headers)

    await client.post("/_sim/regions/eastus2", json={"throttle_headers": "minus1"})
    throttled = await client.post(AZURE_CHAT, json=CHAT, headers=headers())
    assert throttled.status == 429 and throttled.headers["retry-after"] == "1"
    assert throttled.headers["x-ratelimit-remaining-tokens"] == "-1"
    assert throttled.headers["x-ratelimit-remaining-requests"] == "-1"


async def test_reset_after_chunks_breaks_the_stream(make_client: Any) -> None:
    client = await make_client(config(region(reset_after_chunks=2)))
    resp = await client.post(AZURE_CHAT, json={**CHAT, "stream": True}, headers=headers())
    assert resp.status == 200
    received = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for line in resp.content:
            if line.startswith(b"data: "):
                received.append(line)
    assert len(received) == 2
    assert (await stats(client))["failed"] == 1


async def test_hang_times_out_client_without_blocking_others(make_client: Any) -> None:
    client = await make_client(config(region(hang=True), region("eastus")))
    eastus = "/eastus/openai/deployments/gpt-4/chat/completions?api-version=2024-06-01"
    hung = asyncio.create_task(
        client.post(
            AZURE_CHAT, json=CHAT, headers=headers(), timeout=aiohttp.ClientTimeout(total=0.3)
        )
    )
    await asyncio.sleep(0.05)
    assert (await client.post(eastus, json=CHAT, headers=headers())).status == 200
    with pytest.raises(asyncio.TimeoutError):
        await hung


async def test_shutdown_releases_hung_requests() -> None:
    runner, base = await sim.start(config(region(hang=True)))
    async with aiohttp.ClientSession() as session:
        hung = asyncio.create_task(session.post(base + AZURE_CHAT, json=CHAT, headers=headers()))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 1.0
        assert (await hung).status == 503


async def test_slowdown_multiplies_latency(make_client: Any) -> None:
    client = await make_client(config(region(latency_base_ms=30, slowdown=3)))
    started = time.monotonic()
    await client.post(AZURE_CHAT, json=CHAT, headers=headers())
    assert time.monotonic() - started >= 0.09


# --- control and stats ----------------------------------------------------------------------


async def test_control_endpoint(make_client: Any) -> None:
    client = await make_client()
    resp = await client.post("/_sim/regions/eastus2", json={"fail_rate": 0.5, "hang": False})
    assert resp.status == 200
    knobs = await resp.json()
    assert knobs["fail_rate"] == 0.5 and "api_key" not in knobs
    assert (await (await client.get("/_sim/regions/eastus2")).json()) == knobs
    for bad in ({"nope": 1}, {"fail_rate": 2}, {"throttle_headers": "weird"}, {"hang": "yes"}):
        resp = await client.post("/_sim/regions/eastus2", json=bad)
        assert resp.status == 400, bad
    assert (await (await client.get("/_sim/regions/eastus2")).json())["fail_rate"] == 0.5
    assert (await client.post("/_sim/regions/nowhere", json={})).status == 404


async def test_stats_and_reset(make_client: Any) -> None:
    client = await make_client(clock=FakeClock())  # no refill between the requests
    bodies = [{**CHAT, "max_tokens": 10}, {**CHAT, "max_tokens": 30}]
    for body in bodies:
        await client.post(AZURE_CHAT, json=body, headers=headers())
    expected = sum(CHAT_OP.prompt_tokens(b) + b["max_tokens"] for b in bodies)
    s = await stats(client)
    assert (s["requests"], s["admitted"], s["admitted_tokens"]) == (2, 2, expected)
    assert s["peak_window_tokens"] == expected
    assert s["tokens_available"] == pytest.approx(100_000 / 6 - expected)
    assert s["max_tokens_over_window"] == pytest.approx(100_000 + 100_000 / 6)
    await client.post("/_sim/reset")
    s = await stats(client)
    assert (s["requests"], s["admitted_tokens"], s["peak_window_tokens"]) == (0, 0, 0)
    assert s["tokens_available"] == pytest.approx(100_000 / 6)


async def test_same_seed_same_answers(make_client: Any) -> None:
    answers = []
    for _ in range(2):
        client = await make_client()
        data = await (await client.post(AZURE_CHAT, json=CHAT, headers=headers())).json()
        answers.append(data["usage"]["completion_tokens"])
    assert answers[0] == answers[1]


def test_reference_regions_and_cli_config() -> None:
    regions = sim.reference_regions("gpt-4o", [SimDeployment("embed", 50_000)])
    assert len(regions) == 8
    assert {r.name: r.deployments[0].tpm for r in regions} == sim.REFERENCE_TPM
    assert sim.REFERENCE_TPM["eastus2"] == 100_000
    assert sim.REFERENCE_TPM["switzerlandnorth"] == 40_000
    assert sim.REFERENCE_TPM["francecentral"] == 20_000
    assert all([d.name for d in r.deployments] == ["gpt-4o", "embed"] for r in regions)
    assert regions[0].deployments[0].rpm == 600
    assert regions[0].deployments[1] is not regions[1].deployments[1]

    parser = argparse.ArgumentParser()
    sim.add_arguments(parser)
    cfg = sim.config_from_args(parser.parse_args(["--time-scale", "10", "--seed", "3"]))
    assert (cfg.time_scale, cfg.seed, len(cfg.regions)) == (10, 3, 8)


# --- the official SDK -----------------------------------------------------------------------


@pytest.fixture
async def sim_url(aiohttp_server: Any) -> str:
    server = await aiohttp_server(create_app(config()))
    return str(server.make_url("")).rstrip("/")


async def check_sdk(client: openai.AsyncOpenAI) -> None:
    messages: Any = CHAT["messages"]
    reply = await client.chat.completions.create(model="gpt-4", messages=messages, max_tokens=20)
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens >= 10

    stream = await client.chat.completions.create(
        model="gpt-4",
        messages=messages,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage and len(text.split()) == chunks[-1].usage.completion_tokens

    embedding = await client.embeddings.create(model="gpt-4", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 8

    with pytest.raises(openai.AuthenticationError):
        await client.with_options(api_key="wrong").chat.completions.create(
            model="gpt-4", messages=messages
        )


async def test_openai_sdk(sim_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{sim_url}/eastus2/v1", api_key=KEY, max_retries=0)
    async with client:
        await check_sdk(client)


async def test_azure_openai_sdk(sim_url: str) -> None:
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=f"{sim_url}/eastus2", api_version="2024-06-01", api_key=KEY, max_retries=0
    )
    async with client:
        await check_sdk(client)
