"""The simulator's Responses API and Azure's v1 and dated routes, over real HTTP: shapes the
official SDK parses (strictly), continuations, stored responses and their id routes,
background responses, streams, Azure's Responses rate-limit headers, the store counters."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent

from balancer.operations import OPERATIONS
from balancer.sim import SimConfig, SimDeployment, SimRegion, create_app

KEY = "secret"
OP = OPERATIONS["responses"]
BODY: dict[str, Any] = {
    "model": "gpt-4",
    "input": "Say hello to the simulator.",
    "instructions": "Be brief.",
    "max_output_tokens": 40,
}
V1 = "/eastus2/openai/v1/responses"
DATED = "/eastus2/openai/responses"
OPENAI = "/eastus2/v1/responses"
VERSION = {"api-version": "2025-04-01-preview"}
STREAM_EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)
ITEMS = pydantic.TypeAdapter(ResponseItem)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def region(name: str = "eastus2", tpm: int = 100_000, rpm: int | None = None,
           **knobs: Any) -> SimRegion:
    knobs = {"api_key": KEY, "latency_base_ms": 0.0, "latency_per_token_ms": 0.0, **knobs}
    return SimRegion(name, [SimDeployment("gpt-4", tpm, rpm)], **knobs)


def config(*regions: SimRegion, **options: Any) -> SimConfig:
    return SimConfig(list(regions) or [region(), region("eastus")], seed=7, **options)


@pytest.fixture
async def make_client(aiohttp_client: Any):
    async def make(cfg: SimConfig | None = None, clock: FakeClock | None = None) -> Any:
        return await aiohttp_client(create_app(cfg or config(), clock=clock or time.monotonic))

    return make


@pytest.fixture
async def sim_url(aiohttp_server: Any) -> str:
    server = await aiohttp_server(create_app(config()))
    return str(server.make_url("")).rstrip("/")


def auth(path: str, key: str = KEY) -> dict[str, str]:
    """The key as each route family takes it: Bearer on OpenAI's, `api-key` on Azure's."""
    return {"api-key": key} if "/openai/" in path else {"Authorization": f"Bearer {key}"}


def query(path: str) -> dict[str, str]:
    return VERSION if path.startswith(DATED) else {}


async def create(client: Any, path: str = V1, **fields: Any) -> Any:
    return await client.post(path, json={**BODY, **fields}, headers=auth(path),
                             params=query(path))


async def created(client: Any, path: str = V1, **fields: Any) -> dict[str, Any]:
    resp = await create(client, path, **fields)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def sim_stats(client: Any) -> dict[str, Any]:
    return await (await client.get("/_sim/stats")).json()


async def sse(resp: aiohttp.ClientResponse) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event of a stream."""
    events, name = [], ""
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


# --- the official SDK -----------------------------------------------------------------------


@pytest.mark.parametrize("base", ["/eastus2/openai/v1/", "/eastus2/v1"])
async def test_sdk_create_stream_and_id_routes(sim_url: str, base: str) -> None:
    client = openai.AsyncOpenAI(base_url=sim_url + base, api_key=KEY, max_retries=0)
    async with client:
        reply = await client.responses.create(
            model="gpt-4", input="Say hello.", instructions="Be brief.", max_output_tokens=20
        )
        assert reply.id.startswith("resp_") and reply.object == "response"
        assert reply.status in ("completed", "incomplete") and reply.model == "gpt-4"
        assert reply.usage and reply.usage.input_tokens == OP.prompt_tokens(
            {"input": "Say hello.", "instructions": "Be brief."})
        assert 10 <= reply.usage.output_tokens <= 20
        assert len(reply.output_text.split()) == reply.usage.output_tokens

        stream = await client.responses.create(
            model="gpt-4", input="Stream it.", max_output_tokens=20, stream=True
        )
        events = [event async for event in stream]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[0].type == "response.created"
        final = events[-1]
        assert final.type in ("response.completed", "response.incomplete")
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert final.response.usage and len(text.split()) == final.response.usage.output_tokens
        assert final.response.output_text == text

        follow = await client.responses.create(
            model="gpt-4", input="And then?", previous_response_id=final.response.id
        )
        assert follow.previous_response_id == final.response.id
        assert (await client.responses.retrieve(follow.id)).id == follow.id
        items = [item async for item in client.responses.input_items.list(follow.id)]
        assert [i.type for i in items] == ["message"]
        await client.responses.delete(follow.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(follow.id)
        with pytest.raises(openai.BadRequestError, match="background=true"):
            await client.responses.cancel(reply.id)
        with pytest.raises(openai.AuthenticationError):
            await client.with_options(api_key="wrong").responses.retrieve(reply.id)


async def test_sdk_chat_via_azure_v1(sim_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{sim_url}/eastus2/openai/v1/", api_key=KEY,
                                max_retries=0)
    async with client:
        messages: Any = [{"role": "user", "content": "hi"}]
        chat = await client.chat.completions.create(model="gpt-4", messages=messages,
                                                    max_tokens=10)
        assert chat.choices[0].message.content and chat.usage
        embedding = await client.embeddings.create(model="gpt-4", input=["a", "b"])
        assert len(embedding.data) == 2


# --- routes and auth ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [V1, DATED, OPENAI])
async def test_create_on_each_route_parses_strictly(make_client: Any, path: str) -> None:
    client = await make_client()
    resp = await create(client, path, metadata={"k": "v"}, temperature=0.5)
    assert resp.status == 200 and resp.headers["x-sim-region"] == "eastus2"
    data = await resp.json()
    parsed = Response.model_validate(data)  # strict: every required field is there
    assert parsed.output[0].type == "message" and parsed.output[0].content[0].type == "output_text"
    assert data["usage"]["input_tokens"] == OP.prompt_tokens(BODY)
    assert data["usage"]["total_tokens"] == sum(data["usage"][k] for k in ("input_tokens",
                                                                           "output_tokens"))
    assert (data["instructions"], data["max_output_tokens"], data["metadata"]) == (
        "Be brief.", 40, {"k": "v"})
    assert (data["store"], data["background"], data["temperature"]) == (True, False, 0.5)
    assert (data["tools"], data["tool_choice"], data["truncation"]) == ([], "auto", "disabled")
    stats = (await sim_stats(client))["regions"]["eastus2"]["gpt-4"]
    assert stats["admitted_tokens"] == OP.prompt_tokens(BODY) + 40


async def test_route_rules(make_client: Any) -> None:
    client = await make_client()
    # the dated route needs its api-version; v1 ignores one
    assert (await client.post(DATED, json=BODY, headers=auth(DATED))).status == 404
    resp = await client.post(V1, json=BODY, headers=auth(V1), params=VERSION)
    assert resp.status == 200
    # Azure's v1 takes a Bearer key too; the dated routes only `api-key`
    assert (await client.post(V1, json=BODY, headers=auth(OPENAI))).status == 200
    resp = await client.post(DATED, json=BODY, headers=auth(OPENAI), params=VERSION)
    assert resp.status == 401
    assert (await client.post(V1, json=BODY, headers=auth(V1, "wrong"))).status == 401
    # no deployment route for responses, as on Azure
    path = "/eastus2/openai/deployments/gpt-4/responses"
    assert (await client.post(path, json=BODY, headers=auth(DATED), params=VERSION)).status == 404
    # the deployment is the body's model
    resp = await client.post(V1, json={**BODY, "model": "gpt-5"}, headers=auth(V1))
    assert resp.status == 404
    resp = await client.post(V1, json={"input": "x"}, headers=auth(V1))
    assert resp.status == 400
    resp = await client.post(V1, json={"model": "gpt-4"}, headers=auth(V1))  # no input
    assert (await resp.json())["error"]["param"] == "input"


async def test_chat_and_embeddings_on_azure_v1(make_client: Any) -> None:
    client = await make_client()
    chat = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    for params in ({}, VERSION):
        resp = await client.post("/eastus2/openai/v1/chat/completions", json=chat,
                                 headers=auth(V1), params=params)
        assert resp.status == 200
        data = await resp.json()
        assert data["object"] == "chat.completion" and data["model"] == "gpt-4"
        assert int(resp.headers["x-ratelimit-remaining-tokens"]) > 0  # chat: real counts
    resp = await client.post("/eastus2/openai/v1/embeddings", json={"model": "gpt-4",
                                                                    "input": "x"},
                             headers=auth(V1))
    assert (await resp.json())["object"] == "list"


# --- continuations --------------------------------------------------------------------------


async def test_previous_response_in_the_same_region_bills_the_context(make_client: Any) -> None:
    client = await make_client(clock=FakeClock())
    first = await created(client)
    follow_body = {"input": [{"role": "user", "content": "And then?"}],
                   "max_output_tokens": 30}
    second = await created(client, DATED, previous_response_id=first["id"], **follow_body)
    context = first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    own = OP.prompt_tokens({**BODY, **follow_body})
    assert second["usage"]["input_tokens"] == own + context
    assert second["previous_response_id"] == first["id"]
    stats = await sim_stats(client)
    charged = OP.prompt_tokens(BODY) + 40 + own + context + 30
    assert stats["regions"]["eastus2"]["gpt-4"]["admitted_tokens"] == charged
    assert stats["responses"]["eastus2"] == {"stored": 2, "id_calls": 1, "not_found": 0}


async def test_previous_response_from_another_region_is_not_found(make_client: Any) -> None:
    client = await make_client()
    first = await created(client)
    path = "/eastus/openai/v1/responses"
    resp = await client.post(path, json={**BODY, "previous_response_id": first["id"]},
                             headers=auth(path))
    assert resp.status == 400
    assert await resp.json() == {"error": {
        "message": f"Previous response with id '{first['id']}' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }}
    responses = (await sim_stats(client))["responses"]
    assert responses["eastus"] == {"stored": 0, "id_calls": 1, "not_found": 1}
    assert responses["eastus2"] == {"stored": 1, "id_calls": 0, "not_found": 0}
    stats = (await sim_stats(client))["regions"]["eastus"]["gpt-4"]
    assert stats["admitted_tokens"] == 0  # refused before admission


# --- stored responses and their id routes ---------------------------------------------------


@pytest.mark.parametrize("prefix", [V1, DATED, OPENAI])
async def test_id_routes(make_client: Any, prefix: str) -> None:
    client = await make_client()
    items = ["first", {"role": "developer", "content": "second"},
             {"role": "user", "content": [{"type": "input_text", "text": "third"}]}]
    made = await created(client, prefix, input=items)
    ident, kw = made["id"], {"headers": auth(prefix), "params": query(prefix)}

    got = await client.get(f"{prefix}/{ident}", **kw)
    assert got.status == 200 and await got.json() == made

    listed = await (await client.get(f"{prefix}/{ident}/input_items", **kw)).json()
    assert listed["object"] == "list" and listed["has_more"] is False
    assert [i["content"][0]["text"] for i in listed["data"]] == ["third", "second", "first"]
    assert all(i["id"].startswith("msg_") and i["type"] == "message" for i in listed["data"])
    for item in listed["data"]:
        ITEMS.validate_python(item)
    assert (listed["first_id"], listed["last_id"]) == (listed["data"][0]["id"],
                                                       listed["data"][-1]["id"])
    params = {**query(prefix), "order": "asc", "limit": "2"}
    page = await (await client.get(f"{prefix}/{ident}/input_items", headers=auth(prefix),
                                   params=params)).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["first", "second"]
    assert page["has_more"] is True
    params["after"] = page["last_id"]
    page = await (await client.get(f"{prefix}/{ident}/input_items", headers=auth(prefix),
                                   params=params)).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["third"]
    assert page["has_more"] is False

    resp = await client.post(f"{prefix}/{ident}/cancel", **kw)
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == (
        "Only responses created with background=true can be cancelled.")

    resp = await client.delete(f"{prefix}/{ident}", **kw)
    assert await resp.json() == {"id": ident, "object": "response", "deleted": True}
    resp = await client.get(f"{prefix}/{ident}", **kw)
    assert resp.status == 404
    assert await resp.json() == {"error": {
        "message": f"Response with id '{ident}' not found.",
        "type": "invalid_request_error", "param": None, "code": None,
    }}
    assert (await sim_stats(client))["responses"]["eastus2"] == {
        "stored": 0, "id_calls": 7, "not_found": 1}


async def test_id_routes_check_key_and_api_version(make_client: Any) -> None:
    client = await make_client()
    ident = (await created(client))["id"]
    assert (await client.get(f"{V1}/{ident}", headers=auth(V1, "wrong"))).status == 401
    assert (await client.get(f"{DATED}/{ident}", headers=auth(DATED))).status == 404
    other = f"/eastus/openai/v1/responses/{ident}"
    assert (await client.get(other, headers=auth(V1))).status == 404
    responses = (await sim_stats(client))["responses"]
    assert responses["eastus"] == {"stored": 0, "id_calls": 1, "not_found": 1}
    assert responses["eastus2"]["id_calls"] == 0  # refused calls never looked it up
    tokens = (await sim_stats(client))["regions"]["eastus2"]["gpt-4"]["admitted_tokens"]
    assert (await client.get(f"{V1}/{ident}", headers=auth(V1))).status == 200
    after = (await sim_stats(client))["regions"]["eastus2"]["gpt-4"]["admitted_tokens"]
    assert after == tokens  # id routes cost no tokens


async def test_store_false_is_not_kept(make_client: Any) -> None:
    client = await make_client()
    made = await created(client, store=False)
    assert made["store"] is False
    assert (await client.get(f"{V1}/{made['id']}", headers=auth(V1))).status == 404
    resp = await create(client, store=False, background=True)
    assert resp.status == 400


async def test_background_completes_on_the_clock_or_is_cancelled(make_client: Any) -> None:
    clock = FakeClock()
    client = await make_client(config(region(latency_base_ms=1000)), clock)
    started = time.monotonic()
    queued = await created(client, background=True)
    assert time.monotonic() - started < 0.5  # answered at once, not after its latency
    assert (queued["status"], queued["usage"], queued["background"]) == ("queued", None, True)
    Response.model_validate(queued)
    url = f"{V1}/{queued['id']}"
    assert (await (await client.get(url, headers=auth(V1))).json())["status"] == "queued"
    clock.now += 1.0
    done = await (await client.get(url, headers=auth(V1))).json()
    assert done["status"] in ("completed", "incomplete") and done["usage"]["output_tokens"] > 0
    assert done["output"][0]["content"][0]["text"]

    other = await created(client, background=True)
    cancelled = await (await client.post(f"{V1}/{other['id']}/cancel", headers=auth(V1))).json()
    assert cancelled["status"] == "cancelled" and cancelled["usage"] is None
    clock.now += 5.0  # a cancelled response stays cancelled
    got = await (await client.get(f"{V1}/{other['id']}", headers=auth(V1))).json()
    assert got["status"] == "cancelled"


async def test_output_using_the_whole_budget_is_incomplete(make_client: Any) -> None:
    client = await make_client(config(region(), completion_fraction=(1.0, 1.0)))
    made = await created(client)
    assert made["status"] == "incomplete"
    assert made["incomplete_details"] == {"reason": "max_output_tokens"}
    assert made["usage"]["output_tokens"] == 40 and made["output"][0]["status"] == "incomplete"


# --- streams --------------------------------------------------------------------------------


async def test_stream_events(make_client: Any) -> None:
    client = await make_client()
    resp = await create(client, DATED, stream=True)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    events = await sse(resp)
    for name, data in events:
        assert name == data["type"]
        STREAM_EVENTS.validate_python(data)
    kinds = [name for name, _ in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    text = "".join(data["delta"] for name, data in events if name.endswith("text.delta"))
    assert len(text.split()) == final["usage"]["output_tokens"]
    assert final["usage"]["input_tokens"] == OP.prompt_tokens(BODY)
    assert events[0][1]["response"]["usage"] is None
    stored = await client.get(f"{DATED}/{final['id']}", headers=auth(DATED), params=VERSION)
    assert await stored.json() == final  # a streamed response is stored too


async def test_stream_reset_after_chunks(make_client: Any) -> None:
    client = await make_client(config(region(reset_after_chunks=3)))
    resp = await create(client, stream=True)
    received = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for line in resp.content:
            if line.startswith(b"data: "):
                received.append(line)
    assert len(received) == 3
    assert (await sim_stats(client))["regions"]["eastus2"]["gpt-4"]["failed"] == 1


# --- rate-limit headers ---------------------------------------------------------------------


async def test_azure_responses_headers_minus1_and_no_retry_after(make_client: Any) -> None:
    clock = FakeClock()
    client = await make_client(config(region(rpm=60)), clock)  # one request per second
    ok = await create(client)
    throttled = await create(client)
    assert (ok.status, throttled.status) == (200, 429)
    for resp in (ok, throttled):
        assert resp.headers["x-ratelimit-remaining-tokens"] == "-1"
        assert resp.headers["x-ratelimit-remaining-requests"] == "-1"
    assert "retry-after" not in throttled.headers and "retry-after-ms" not in throttled.headers
    error = (await throttled.json())["error"]
    assert error["code"] == "429" and "Please retry after 1 second" in error["message"]
    assert "Responses_Create" in error["message"]

    # the OpenAI route sends normal headers
    clock.now += 1
    assert (await create(client, OPENAI)).headers["x-ratelimit-remaining-requests"] == "0"
    throttled = await create(client, OPENAI)
    assert throttled.status == 429 and throttled.headers["retry-after"] == "1"

    # the knob "normal": Azure's routes send them too
    resp = await client.post("/_sim/regions/eastus2", json={"responses_headers": "normal"})
    assert (await resp.json())["responses_headers"] == "normal"
    throttled = await create(client, DATED)
    assert throttled.status == 429 and throttled.headers["retry-after"] == "1"
    assert throttled.headers["x-ratelimit-remaining-requests"] == "0"
    bad = await client.post("/_sim/regions/eastus2", json={"responses_headers": "weird"})
    assert bad.status == 400


async def test_faults_apply_to_responses(make_client: Any) -> None:
    client = await make_client(config(region(fail_rate=1.0, fail_status=503)))
    resp = await create(client)
    assert resp.status == 503 and resp.headers["x-ratelimit-remaining-tokens"] == "-1"
    await client.post("/_sim/regions/eastus2", json={"fail_rate": 0.0, "malformed": "json"})
    resp = await create(client)
    with pytest.raises(json.JSONDecodeError):
        json.loads(await resp.text())


# --- stats ----------------------------------------------------------------------------------


async def test_reset_clears_counters_but_keeps_responses(make_client: Any) -> None:
    client = await make_client()
    ident = (await created(client))["id"]
    await client.get(f"{V1}/{ident}", headers=auth(V1))
    await client.get(f"{V1}/resp_missing", headers=auth(V1))
    assert (await sim_stats(client))["responses"]["eastus2"] == {
        "stored": 1, "id_calls": 2, "not_found": 1}
    await client.post("/_sim/reset")
    responses = (await sim_stats(client))["responses"]
    assert responses == {"eastus2": {"stored": 1, "id_calls": 0, "not_found": 0},
                         "eastus": {"stored": 0, "id_calls": 0, "not_found": 0}}
    assert (await client.get(f"{V1}/{ident}", headers=auth(V1))).status == 200
