"""GET /clients and the per-client budget gauges of /metrics, through a real gateway on
simulated regions: what each client used and has left matches what its requests were
charged, no key material ever shows, the route is admin only, and a client over its
tpm budget gets its own 429 while its successes carry its own x-ratelimit-* headers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancer import config as config_mod
from balancer import sim
from balancer.config import Config
from balancer.gateway.runtime import RUNTIME
from tests.conftest import Stack, StackFactory
from tests.store.conftest import redis_url  # noqa: F401 (the shared Redis fixture)

A_KEY = "ck-team-a-" + "a1" * 16
B_KEY = "ck-team-b-" + "b2" * 16
C_KEY = "ck-team-c-" + "c3" * 16
B_SHA = hashlib.sha256(B_KEY.encode()).hexdigest()
ADMIN_KEY = "adm-" + "d4" * 16
MAX_TOKENS = 20

A_BUDGET = {"tpm": 60_000, "tokens_per_day": 100_000, "tokens_per_month": 1_000_000}
B_BUDGET = {"tpm": 3_000, "rpm": 600, "tokens_per_day": 50_000}  # a 500-token bucket

REGIONS = """
regions:
  - name: east
    kind: azure
    endpoint: http://placeholder
    api_version: "2024-06-01"
    deployments:
      gpt-4: {deployment: gpt-4-dep, tpm: 600000}
      emb: {deployment: emb-dep, tpm: 600000}
clients:
  - name: team-a
    key: ${TEAM_A_KEY}
    weight: 2
    budgets:
      gpt-4: {tpm: 60000, tokens_per_day: 100000, tokens_per_month: 1000000}
  - name: team-b
    key_sha256: B_SHA
    budgets:
      gpt-4: {tpm: 3000, rpm: 600, tokens_per_day: 50000}
  - name: team-c
    key: ${TEAM_C_KEY}
""".replace("B_SHA", B_SHA)


def clients_config(*, store_url: str | None = None) -> Config:
    cfg = config_mod.parse(REGIONS, "test.yaml", {"TEAM_A_KEY": A_KEY, "TEAM_C_KEY": C_KEY})
    if store_url is not None:
        cfg = replace(cfg, store=replace(cfg.store, url=store_url,
                                         key_prefix=f"t{uuid.uuid4().hex[:10]}"))
    return cfg


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def chat(s: Stack, key: str, max_tokens: int = MAX_TOKENS,
               headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": max_tokens}
    async with aiohttp.ClientSession() as http, http.post(
            f"{s.url}/v1/chat/completions", json=body,
            headers={**bearer(key), **(headers or {})}) as r:
        return r.status, r.headers, await r.json(content_type=None)


def charged(answer: Any, max_tokens: int = MAX_TOKENS) -> int:
    """What settle (quota mode) charges: the real prompt plus the completion budget."""
    usage = answer["usage"]
    return usage["prompt_tokens"] + max(max_tokens, usage["completion_tokens"])


async def get(s: Stack, path: str, key: str | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{s.url}{path}", headers=bearer(key) if key else {}) as r:
        return r.status, await r.text()


async def clients_view(s: Stack) -> dict[str, Any]:
    status, text = await get(s, "/clients", ADMIN_KEY)
    assert status == 200, text
    body = json.loads(text)
    return {c["name"]: c for c in body["clients"]} | {"": body}


async def settled(s: Stack, want: dict[str, int]) -> dict[str, Any]:
    """/clients once every client's used_today on gpt-4 is what its requests were
    charged (settling follows the response by a moment)."""
    for _ in range(100):
        view = await clients_view(s)
        if all(view[name]["models"]["gpt-4"]["used_today"] == n for name, n in want.items()):
            return view
        await asyncio.sleep(0.02)
    raise AssertionError(f"used_today never matched {want}: {view}")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def client_gauges(text: str, name: str) -> dict[tuple[str, str, str], float]:
    """(client, model, period) -> value of the gauge `name`."""
    out = {}
    for (metric, labels), value in samples(text).items():
        if metric == name:
            d = dict(labels)
            out[d["client"], d["model"], d["period"]] = value
    return out


def assert_no_key_material(text: str) -> None:
    for key in (A_KEY, B_KEY, C_KEY, ADMIN_KEY):
        digest = hashlib.sha256(key.encode()).hexdigest()
        for secret in (key, digest, digest.upper()):
            assert secret not in text, "key material in the answer"
    assert "key" not in json.dumps(json.loads(text)["clients"]).lower()


@pytest.fixture
def admin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALANCER_ADMIN_KEYS", ADMIN_KEY)
    monkeypatch.delenv("BALANCER_API_KEYS", raising=False)


async def exercise(s: Stack) -> None:
    """Requests as team-a and team-b; then /clients and /metrics agree with what they
    were charged. Shared by the memory and the Redis test."""
    used = {"team-a": 0, "team-b": 0}
    for key, name, n in ((A_KEY, "team-a", 3), (B_KEY, "team-b", 2)):
        for _ in range(n):
            status, headers, answer = await chat(s, key)
            assert status == 200, answer
            used[name] += charged(answer)
            tpm = (A_BUDGET if name == "team-a" else B_BUDGET)["tpm"]
            assert headers["x-ratelimit-limit-tokens"] == str(tpm)
            assert int(headers["x-ratelimit-remaining-tokens"]) < tpm
    status, headers, _ = await chat(s, C_KEY)  # no budget: no x-ratelimit-* of its own
    assert status == 200 and "x-ratelimit-limit-tokens" not in headers

    view = await settled(s, used)
    assert view[""]["store"] == s.app[RUNTIME].store.name and view[""]["degraded"] is False
    a, b, c = view["team-a"], view["team-b"], view["team-c"]
    assert (a["class"], a["weight"], set(a["models"])) == (None, 2.0, {"gpt-4"})
    ga = a["models"]["gpt-4"]
    assert ga["budget"] == {"tpm": 60_000, "rpm": None, "tokens_per_day": 100_000,
                            "tokens_per_month": 1_000_000}
    assert ga["used_this_month"] == used["team-a"]
    assert ga["remaining"]["day"] == 100_000 - used["team-a"]
    assert ga["remaining"]["month"] == 1_000_000 - used["team-a"]
    assert 0 <= ga["remaining"]["minute"] <= 60_000  # refilled at 1000 tokens/s
    assert ga["fair_share"]["demand_tokens_per_second"] > 0
    assert ga["fair_share"]["used_tokens_per_second"] > 0
    gb = b["models"]["gpt-4"]
    assert gb["remaining"]["day"] == 50_000 - used["team-b"]
    assert gb["remaining"]["month"] is None  # no monthly quota
    assert 0 <= gb["remaining"]["minute"] <= 3_000
    # A client without budgets is shown on every model, with what it used.
    assert set(c["models"]) == {"gpt-4", "emb"}
    assert c["models"]["gpt-4"]["budget"] == dict.fromkeys(
        ("tpm", "rpm", "tokens_per_day", "tokens_per_month"))
    assert c["models"]["gpt-4"]["used_today"] > 0
    assert c["models"]["emb"]["used_today"] == 0

    # A second look: remaining decreases with use.
    status, _, answer = await chat(s, A_KEY)
    assert status == 200
    used["team-a"] += charged(answer)
    after = (await settled(s, used))["team-a"]["models"]["gpt-4"]
    assert after["remaining"]["day"] == ga["remaining"]["day"] - charged(answer)

    status, text = await get(s, "/metrics", ADMIN_KEY)
    assert status == 200
    budgets = client_gauges(text, "balancer_client_budget_tokens")
    left = client_gauges(text, "balancer_client_budget_remaining_tokens")
    assert budgets == {("team-a", "gpt-4", "minute"): 60_000,
                       ("team-a", "gpt-4", "day"): 100_000,
                       ("team-a", "gpt-4", "month"): 1_000_000,
                       ("team-b", "gpt-4", "minute"): 3_000,
                       ("team-b", "gpt-4", "day"): 50_000}
    assert set(left) == set(budgets)  # team-c has no budget: no series
    assert left["team-a", "gpt-4", "day"] == 100_000 - used["team-a"]
    assert left["team-a", "gpt-4", "month"] == 1_000_000 - used["team-a"]
    assert left["team-b", "gpt-4", "day"] == 50_000 - used["team-b"]
    assert 0 <= left["team-b", "gpt-4", "minute"] <= 3_000
    for key in (A_KEY, B_KEY, C_KEY, ADMIN_KEY):
        assert key not in text and hashlib.sha256(key.encode()).hexdigest() not in text


async def test_clients_route_and_gauges_follow_what_clients_were_charged(
        stack: StackFactory, admin_env: None) -> None:
    s = await stack(clients_config())
    await exercise(s)
    status, text = await get(s, "/clients", ADMIN_KEY)
    assert status == 200
    assert_no_key_material(text)


@pytest.mark.redis
async def test_clients_route_on_redis(stack: StackFactory, admin_env: None,
                                      redis_url: str) -> None:  # noqa: F811
    s = await stack(clients_config(store_url=redis_url))
    assert s.app[RUNTIME].store.name.startswith("redis")
    await exercise(s)


async def test_clients_route_needs_the_admin_key(stack: StackFactory, admin_env: None
                                                 ) -> None:
    s = await stack(clients_config())
    for key in (None, A_KEY, B_KEY, "nope"):  # a client key never grants admin
        status, text = await get(s, "/clients", key)
        assert status == 401, (key, text)
        assert json.loads(text)["error"]["code"] == "invalid_api_key"
        for secret in (A_KEY, B_KEY, ADMIN_KEY, B_SHA):
            assert secret not in text
    status, text = await get(s, "/metrics")
    assert status == 401
    status, _ = await get(s, "/clients", ADMIN_KEY)
    assert status == 200


async def test_without_admin_keys_clients_needs_a_client_key(
        stack: StackFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_ADMIN_KEYS", raising=False)
    monkeypatch.delenv("BALANCER_API_KEYS", raising=False)
    s = await stack(clients_config())
    status, _ = await get(s, "/clients")
    assert status == 401
    status, text = await get(s, "/clients", C_KEY)
    assert status == 200
    assert_no_key_material(text)


async def test_over_its_tpm_budget_a_client_gets_its_own_429(stack: StackFactory,
                                                             admin_env: None) -> None:
    s = await stack(clients_config())
    # team-b's tpm of 3000 fills a bucket of burst_seconds (10 s): 500 tokens.
    status, headers, answer = await chat(s, B_KEY, max_tokens=450)
    assert status == 200, answer
    assert headers["x-ratelimit-limit-tokens"] == "3000"
    assert headers["x-ratelimit-limit-requests"] == "600"
    status, headers, answer = await chat(s, B_KEY, max_tokens=450,
                                         headers={"x-balancer-max-wait-ms": "0"})
    assert status == 429, answer
    assert headers["x-balancer-limit"] == "tpm"
    assert int(headers["Retry-After"]) >= 1
    assert answer["error"]["code"] == "client_tpm_budget_exceeded"
    assert answer["error"]["type"] == "rate_limit_error"
    assert "team-b" in answer["error"]["message"]
    # team-a, on the same pool, is not held by team-b's budget.
    status, _, answer = await chat(s, A_KEY, max_tokens=450)
    assert status == 200, answer
    status, text = await get(s, "/metrics", ADMIN_KEY)
    found = samples(text)
    limited = ("balancer_client_limited_total",
               (("client", "team-b"), ("model", "gpt-4"), ("reason", "tpm")))
    assert found[limited] == 1
    view = await clients_view(s)
    assert view["team-b"]["models"]["gpt-4"]["remaining"]["minute"] < 450 * 6


async def test_a_client_removed_by_a_reload_leaves_the_gauges(stack: StackFactory,
                                                             admin_env: None) -> None:
    s = await stack(clients_config())
    status, _, _ = await chat(s, B_KEY)
    assert status == 200
    _, text = await get(s, "/metrics", ADMIN_KEY)
    assert ("team-b", "gpt-4", "day") in client_gauges(text, "balancer_client_budget_tokens")
    rt = s.app[RUNTIME]
    fewer = replace(rt.config, clients=tuple(c for c in rt.config.clients
                                             if c.name != "team-b"))
    rt.apply(sim.with_simulated_endpoints(fewer, s.sim_url))
    _, text = await get(s, "/metrics", ADMIN_KEY)
    for name in ("balancer_client_budget_tokens", "balancer_client_budget_remaining_tokens"):
        gauges = client_gauges(text, name)
        assert {client for client, _, _ in gauges} == {"team-a"}, name
    view = await clients_view(s)
    assert "team-b" not in view and {"team-a", "team-c"} <= set(view)
