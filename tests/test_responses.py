"""The Responses API through two gateway replicas sharing a real Redis, with the
unmodified openai SDK, against simulated regions of every route style: Azure v1
(`/openai/v1/`), Azure dated (`/openai/responses?api-version=`) and OpenAI (`/v1/`).

A stored response lives in one region; every follow-up (retrieve, delete, cancel,
input items, continue with previous_response_id) must reach that region and no
other, whichever replica receives it. The simulator counts id lookups a region
could not answer (`not_found`): the tests assert there are none.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from balancer import config as config_mod
from balancer import sim
from balancer.config import Config
from balancer.gateway import create_app
from balancer.gateway.runtime import RUNTIME
from balancer.protocol import GatewayRunner
from tests.conftest import free_port
from tests.store.conftest import redis_url  # noqa: F401 (the shared Redis fixture)

pytestmark = pytest.mark.redis

REGIONS = """
latency_weighting: {enabled: false}  # one noisy sample must not starve a style
regions:
  - {name: east, kind: azure, endpoint: http://x, api_version: v1,
     deployments: {gpt-4: {deployment: gpt-4-dep, tpm: 600000}, emb: {tpm: 600000}}}
  - {name: west, kind: azure, endpoint: http://x, api_version: "2025-04-01-preview",
     deployments: {gpt-4: {deployment: gpt-4-dep, tpm: 600000}, emb: {tpm: 600000}}}
  - {name: oai, kind: openai, endpoint: http://x,
     deployments: {gpt-4: {deployment: gpt-4-oai, tpm: 600000}}}
"""


@dataclass
class Pair:
    """One simulator, two gateway replicas on one Redis key space."""

    sim_url: str
    urls: list[str]
    apps: list[web.Application]
    config: Config

    def client(self, replica: int, style: str = "v1") -> openai.AsyncOpenAI:
        base = self.urls[replica]
        if style == "azure":
            return openai.AsyncAzureOpenAI(azure_endpoint=base, api_version="2025-04-01-preview",
                                           api_key="k", max_retries=0)
        path = "/openai/v1/" if style == "azure-v1" else "/v1"
        return openai.AsyncOpenAI(base_url=base + path, api_key="k", max_retries=0)

    async def sim_responses(self) -> dict[str, dict[str, int]]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.sim_url}/_sim/stats") as r:
            return (await r.json())["responses"]


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[Pair]:  # noqa: F811
    cfg = config_mod.parse(REGIONS, "test.yaml", {})
    cfg = replace(cfg, store=replace(cfg.store, url=redis_url,
                                     key_prefix=f"t{uuid.uuid4().hex[:10]}"))
    sim_runner, sim_url = await sim.start(sim.simulator_config(cfg, seed=5))
    cfg = sim.with_simulated_endpoints(cfg, sim_url)
    runners, urls, apps = [], [], []
    for _ in range(2):
        app = create_app(cfg)
        runner = GatewayRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{port}")
        apps.append(app)
    yield Pair(sim_url, urls, apps, cfg)
    for runner in runners:
        await runner.cleanup()
    await sim_runner.cleanup()


async def create(client: openai.AsyncOpenAI, **kw: Any) -> tuple[Any, str]:
    raw = await client.responses.with_raw_response.create(
        model="gpt-4", input="Write a haiku about quotas.", max_output_tokens=24, **kw)
    return raw.parse(), raw.headers["x-balancer-region"]


async def test_create_plain_and_streamed_on_both_base_urls(pair: Pair) -> None:
    seen = set()
    for replica in (0, 1):
        for style in ("v1", "azure-v1", "azure"):
            client = pair.client(replica, style)
            for _ in range(4):
                response, region = await create(client, instructions="Be brief.")
                seen.add(region)
                assert response.status in ("completed", "incomplete")
                assert response.output_text
                assert response.usage is not None and 0 < response.usage.output_tokens <= 24
            stream = await client.responses.create(
                model="gpt-4", input=[{"role": "user", "content": "Stream it."}],
                max_output_tokens=16, stream=True)
            events = [event async for event in stream]
            assert events[0].type == "response.created"
            assert events[-1].type in ("response.completed", "response.incomplete")
            assert events[-1].response.usage.output_tokens > 0
            text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            assert text
            await client.close()
    assert seen == {"east", "west", "oai"}, (seen, await pair.sim_responses())  # every style


async def test_follow_ups_reach_only_the_owner_through_the_other_replica(pair: Pair) -> None:
    first, second = pair.client(0), pair.client(1, "azure-v1")
    owners: dict[str, str] = {}
    # The pick is random (equal weights): create until every region owns one, bounded
    # (9 picks alone missed a region about 1 time in 13).
    for _ in range(60):
        response, region = await create(first)
        owners[response.id] = region
        if len(owners) >= 9 and set(owners.values()) == {"east", "west", "oai"}:
            break
    assert set(owners.values()) == {"east", "west", "oai"}
    for response_id, region in owners.items():
        raw = await second.responses.with_raw_response.retrieve(response_id)
        assert raw.headers["x-balancer-region"] == region
        assert raw.parse().id == response_id
        items = await second.responses.input_items.list(response_id)
        assert items.data and items.data[0].type == "message"
        raw = await second.responses.with_raw_response.create(
            model="gpt-4", input="And another.", previous_response_id=response_id,
            max_output_tokens=8)
        assert raw.headers["x-balancer-region"] == region
        follow = raw.parse()
        assert follow.previous_response_id == response_id
        # The continuation re-reads the whole first exchange as input.
        first_usage = (await second.responses.retrieve(response_id)).usage
        assert follow.usage.input_tokens >= first_usage.input_tokens + first_usage.output_tokens
        await second.responses.delete(response_id)
        with pytest.raises(openai.NotFoundError):
            await first.responses.retrieve(response_id)
    stats = await pair.sim_responses()
    assert sum(s["not_found"] for s in stats.values()) == 0, stats
    assert sum(s["id_calls"] for s in stats.values()) >= 9 * 4
    await first.close()
    await second.close()


async def test_a_restarted_replica_still_knows_the_owner(pair: Pair) -> None:
    client = pair.client(0)
    response, region = await create(client)
    await client.close()
    fresh = create_app(pair.config)  # a new process's view: nothing but the shared store
    runner = GatewayRunner(fresh, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        later = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                                   max_retries=0)
        raw = await later.responses.with_raw_response.retrieve(response.id)
        assert raw.headers["x-balancer-region"] == region
        await later.close()
    finally:
        await runner.cleanup()


async def test_unknown_ids_get_openai_shaped_404s(pair: Pair) -> None:
    client = pair.client(1)
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.retrieve("resp_doesnotexist")
    assert info.value.status_code == 404
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="gpt-4", input="hi",
                                      previous_response_id="resp_doesnotexist")
    assert info.value.code == "previous_response_not_found"
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/responses/..%2F..", "/openai/v1/responses/" + "x" * 300):
            async with s.get(pair.urls[0] + path) as r:
                assert r.status == 404 and "error" in await r.json()
        async with s.get(pair.urls[0] + "/openai/responses/resp_x") as r:  # dated: api-version
            assert r.status == 400
    stats = await pair.sim_responses()
    assert sum(s["id_calls"] for s in stats.values()) == 0  # no region was asked
    await client.close()


async def test_store_false_is_not_pinned(pair: Pair) -> None:
    client = pair.client(0)
    response, _ = await create(client, store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    await client.close()


async def owner_cooling(pair: Pair, seconds: float) -> tuple[str, str]:
    """A response, and its region cooled down as a 429 would (in the shared store)."""
    client = pair.client(0)
    response, region = await create(client)
    await client.close()
    rt = pair.apps[0][RUNTIME]
    route = rt.routes["gpt-4"]
    await rt.store.cooldown("gpt-4", route.only(region).limits[0], seconds)
    return response.id, region


async def test_a_cooling_owner_gets_429_never_another_region(pair: Pair) -> None:
    response_id, _ = await owner_cooling(pair, 30)
    before = await pair.sim_responses()
    async with aiohttp.ClientSession() as s:
        for path, body in (("/v1/responses", {"model": "gpt-4", "input": "more",
                                               "previous_response_id": response_id}),
                           (f"/v1/responses/{response_id}", None)):
            call = s.post if body else s.get
            async with call(pair.urls[1] + path, json=body) as r:
                assert r.status == 429, await r.text()
                assert 1 <= int(r.headers["Retry-After"]) <= 30
                assert (await r.json())["error"]["code"] in ("rate_limit_exceeded",
                                                             "no_capacity")
    after = await pair.sim_responses()
    assert after == before  # nothing reached any region


async def test_a_follow_up_waits_for_a_short_cooldown(pair: Pair) -> None:
    response_id, region = await owner_cooling(pair, 0.6)
    async with aiohttp.ClientSession() as s:
        body = {"model": "gpt-4", "input": "more", "previous_response_id": response_id,
                "max_output_tokens": 8}
        headers = {"x-balancer-max-wait-ms": "5000"}
        async with s.post(pair.urls[1] + "/v1/responses", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            assert r.headers["x-balancer-region"] == region
        async with s.get(f"{pair.urls[1]}/v1/responses/{response_id}", headers=headers) as r:
            assert r.status == 200 and r.headers["x-balancer-region"] == region


async def test_chat_and_embeddings_through_azure_v1(pair: Pair) -> None:
    client = pair.client(1, "azure-v1")
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    assert raw.parse().choices[0].message.content
    stream = await client.chat.completions.create(
        model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=10, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    emb = await client.embeddings.create(model="emb", input=["a", "b"])
    assert len(emb.data) == 2
    models = await client.models.list()
    assert sorted(m.id for m in models.data) == ["emb", "gpt-4"]
    await client.close()


async def test_metrics_carry_the_operation(pair: Pair) -> None:
    client = pair.client(0)
    response, _ = await create(client)
    await client.responses.retrieve(response.id)
    await client.close()
    async with aiohttp.ClientSession() as s, s.get(pair.urls[0] + "/metrics") as r:
        text = await r.text()
    assert 'operation="responses"' in text
    assert 'operation="responses/retrieve"' in text
    assert any(line.startswith("balancer_tokens_total{") and 'operation="responses"' in line
               for line in text.splitlines())


async def test_minus_one_headers_teach_nothing(pair: Pair) -> None:
    """Azure's Responses API reports remaining tokens as -1: the learned capacity of
    every region stays whole after many answers carrying it."""
    client = pair.client(0)
    for _ in range(12):
        await create(client)
    await client.close()
    async with aiohttp.ClientSession() as s, s.get(pair.urls[0] + "/regions") as r:
        rows = (await r.json())["models"]["gpt-4"]
    assert {row["region"]: row["capacity_factor"] for row in rows} == {
        "east": 1.0, "west": 1.0, "oai": 1.0}


async def test_background_response_cancelled_through_the_other_replica(pair: Pair) -> None:
    """A background response answers at once, queued, without usage: its reservation
    stands, and the cancel reaches the region holding it."""
    first, second = pair.client(0), pair.client(1, "azure")
    raw = await first.responses.with_raw_response.create(
        model="gpt-4", input="Take your time.", max_output_tokens=400, background=True)
    queued = raw.parse()
    assert queued.status in ("queued", "in_progress") and queued.usage is None
    cancelled = await second.responses.cancel(queued.id)
    assert cancelled.id == queued.id and cancelled.status in ("cancelled", "completed")
    again = await second.responses.retrieve(queued.id)
    assert again.status == cancelled.status
    stats = await pair.sim_responses()
    assert sum(s["not_found"] for s in stats.values()) == 0
    await first.close()
    await second.close()


async def test_a_stream_cut_before_its_final_event_keeps_the_reservation(pair: Pair) -> None:
    """No final event, no usage: nothing is settled (the reservation stands, as for any
    stream cut), the region counts a broken stream, and the client gets an error event."""
    async with aiohttp.ClientSession() as s:
        for region in ("east", "west", "oai"):
            async with s.post(f"{pair.sim_url}/_sim/regions/{region}",
                              json={"reset_after_chunks": 3}) as r:
                assert r.status == 200
        body = {"model": "gpt-4", "input": "x" * 400, "max_output_tokens": 64, "stream": True}
        async with s.post(pair.urls[0] + "/v1/responses", json=body) as r:
            assert r.status == 200
            text = await r.text()
            region = r.headers["x-balancer-region"]
        async with s.get(pair.urls[0] + "/metrics") as r:
            metrics = await r.text()
    assert '"error"' in text and "response.completed" not in text  # the SDKs raise on it
    assert f'reason="stream_broken",region="{region}"' in metrics
    assert not any(line.startswith("balancer_tokens_total{") and 'operation="responses"' in line
                   for line in metrics.splitlines())  # never settled


HOSTILE = [
    ("POST", "/v1/responses", b"{not json"),
    ("POST", "/v1/responses", b'{"model": "gpt-4", "input": 42}'),
    ("POST", "/v1/responses", b'{"model": "gpt-4", "input": "x", "max_output_tokens": -1}'),
    ("POST", "/v1/responses", b'{"model": "gpt-4", "input": "x", "previous_response_id": 7}'),
    ("POST", "/v1/responses", b'{"model": "gpt-4", "input": "x", "stream": "yes"}'),
    ("POST", "/openai/v1/responses", b'{"input": "no model"}'),
    ("POST", "/openai/responses?api-version=v1", b'{"model": "gpt-4", "input": "x"}'),
    ("POST", "/openai/v1/responses/resp_x/cancel", b"\xff\xfe"),
    ("GET", "/v1/responses/resp_%00%0d%0aX:y", b""),
    ("GET", "/v1/responses/" + "a" * 5000, b""),
    ("DELETE", "/openai/v1/responses/resp_unknown", b"{}"),
    ("PUT", "/v1/responses/resp_x", b""),
    ("GET", "/v1/responses/resp_x/input_items?limit=%ff", b""),
]


async def test_hostile_requests_on_the_new_routes_get_4xx(pair: Pair) -> None:
    async with aiohttp.ClientSession() as s:
        for method, path, body in HOSTILE:
            async with s.request(method, pair.urls[1] + path, data=body,
                                 headers={"Content-Type": "application/json"}) as r:
                assert 400 <= r.status < 500, (method, path, r.status, await r.text())
                assert "error" in await r.json(), (method, path)
