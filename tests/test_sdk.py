"""The official `openai` SDK, unmodified, against the gateway: both client classes,
streaming and not."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Stack, StackFactory, gateway_config

MESSAGES = [{"role": "user", "content": "Write a haiku about quotas."}]


@pytest.fixture
async def gw(stack: StackFactory) -> Stack:
    return await stack(gateway_config({"east": 600_000, "west": 600_000}, fallback=60_000),
                       api_keys=(b"team-key",))


def clients(s: Stack) -> list[openai.AsyncOpenAI]:
    return [
        openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="team-key", max_retries=0),
        openai.AsyncAzureOpenAI(azure_endpoint=s.url, api_version="2024-06-01",
                                api_key="team-key", max_retries=0),
    ]


async def test_chat_both_clients(gw: Stack) -> None:
    for client in clients(gw):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4", messages=MESSAGES, max_tokens=30)
        reply = raw.parse()
        assert raw.headers["x-balancer-region"] in ("east", "west")
        assert reply.choices[0].message.content
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 30
        await client.close()


async def test_stream_both_clients(gw: Stack) -> None:
    for client in clients(gw):
        stream = await client.chat.completions.create(
            model="gpt-4", messages=MESSAGES, max_tokens=30, stream=True)
        parts = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        assert text
        assert all(c.usage is None for c in parts)  # not asked for: not shown
        stream = await client.chat.completions.create(
            model="gpt-4", messages=MESSAGES, max_tokens=30, stream=True,
            stream_options={"include_usage": True})
        parts = [chunk async for chunk in stream]
        assert parts[-1].usage is not None and parts[-1].choices == []
        await client.close()


async def test_completions_and_embeddings(gw: Stack) -> None:
    for client in clients(gw):
        done = await client.completions.create(model="gpt-4", prompt="Once upon", max_tokens=8)
        assert done.choices[0].text
        emb = await client.embeddings.create(model="emb", input=["a", "b", "c"])
        assert len(emb.data) == 3 and emb.usage.prompt_tokens > 0
        await client.close()


async def test_sdk_sees_typed_errors(gw: Stack) -> None:
    bad_key = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad_key.chat.completions.create(model="gpt-4", messages=MESSAGES)
    client = clients(gw)[0]
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-5", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=-3)
    models = await client.models.list()
    assert sorted(m.id for m in models.data) == ["emb", "gpt-4"]
    await bad_key.close()
    await client.close()
