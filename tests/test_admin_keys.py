"""Who a request is from, through a real gateway in front of simulated regions: the
keys of regions.yaml's `clients` (plain or as a SHA-256) and of BALANCER_API_KEYS, each
giving its tenant and class; a reload adding, removing and rotating keys without a
restart; and BALANCER_ADMIN_KEYS guarding /regions and /metrics (admin keys are not
client keys, nor client keys admin keys)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from balancer import config as config_mod
from balancer import sim
from balancer.errors import ClientError
from balancer.gateway import RUNTIME, create_app, proxy
from balancer.gateway.call import Call
from balancer.gateway.clients import ANONYMOUS, Tenant, authorize, authorize_admin
from balancer.gateway.runtime import KeyTable
from balancer.protocol import GatewayRunner
from balancer.reload import Reloader
from tests.conftest import free_port

CHAT = {"model": "gpt-4", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
KEY_A = "ck-team-a-0123456789"
KEY_A2 = "ck-team-a-rotated-9876"
KEY_B = "ck-team-b-abcdef"
KEY_C = "ck-team-c-new"
ADMIN = "adm-0123456789abcdef"

REGIONS = """\
regions:
  - name: east
    kind: azure
    endpoint: http://placeholder
    api_version: "2024-06-01"
    deployments:
      gpt-4: {deployment: gpt-4-dep, tpm: 600000}
fair_share: {enabled: false}   # identity only: budgets and fair share are tested elsewhere
"""


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def clients_yaml(*entries: str) -> str:
    return REGIONS + ("clients:\n" + "".join(f"  - {e}\n" for e in entries) if entries else "")


TWO_CLIENTS = clients_yaml("{name: team-a, key: '${TEAM_A_KEY}', class: high, weight: 2}",
                           f"{{name: team-b, key_sha256: {sha(KEY_B)}, class: low}}")


class Gateway:
    """A gateway (config from a file, keys from `env`) in front of simulated regions."""

    def __init__(self, url: str, app: web.Application, reloader: Reloader):
        self.url = url
        self.app = app
        self.reloader = reloader
        self.seen: list[Call] = []  # every call that reached the attempts

    async def call(self, path: str = "/v1/chat/completions", key: str | None = None, *,
                   bearer: bool = False, method: str = "POST") -> tuple[int, Any]:
        headers = {} if key is None else \
            {"Authorization": f"Bearer {key}"} if bearer else {"api-key": key}
        async with aiohttp.ClientSession() as s, s.request(
                method, f"{self.url}{path}", headers=headers,
                json=CHAT if method == "POST" else None) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body

    async def chat(self, key: str | None = None, **kw: Any) -> tuple[int, Any]:
        return await self.call("/v1/chat/completions", key, **kw)

    async def tenant_of(self, key: str | None) -> tuple[str, int]:
        """The tenant name and queue priority rank a request with `key` gets."""
        before = len(self.seen)
        status, body = await self.chat(key)
        assert status == 200, body
        call = self.seen[before]
        return call.tenant.name, call.priority


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[GatewayFactory]:
    runners: list[web.AppRunner] = []
    gateways: list[Gateway] = []
    real_attempts = proxy.attempts

    async def spy(call: Call, route: Any) -> web.StreamResponse:
        for gw in gateways:
            if call.rt is gw.app[RUNTIME]:
                gw.seen.append(call)
        return await real_attempts(call, route)

    monkeypatch.setattr(proxy, "attempts", spy)

    async def start(text: str, env: MutableMapping[str, str] | None = None) -> Gateway:
        """`text`: regions.yaml; `env`: its variables and the key variables (default:
        os.environ, as `balancer serve` reads them)."""
        env = os.environ if env is None else env
        path = tmp_path / "regions.yaml"
        path.write_text(text)
        cfg = config_mod.load(path, env)
        sim_runner, sim_url = await sim.start(sim.simulator_config(cfg))
        runners.append(sim_runner)

        def load() -> config_mod.Config:  # what `balancer serve` reloads
            return sim.with_simulated_endpoints(config_mod.load(path, env), sim_url)

        app = create_app(load(), env=env)
        runner = GatewayRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        gw = Gateway(f"http://127.0.0.1:{port}", app, Reloader(app, str(path), load))
        gateways.append(gw)
        return gw

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


async def reload(gw: Gateway, text: str) -> None:
    gw.reloader.path.write_text(text)
    assert await gw.reloader.reload("test")


def assert_401(status: int, body: Any, message: str | None = None) -> None:
    assert status == 401, body
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"]
    if message is not None:
        assert message in body["error"]["message"], body


# --------------------------------------------------------------------------- identity


async def test_client_keys_give_tenant_and_class(gateway: GatewayFactory) -> None:
    env = {"TEAM_A_KEY": KEY_A, "BALANCER_API_KEYS": "env-key-1#high, env-key-2"}
    gw = await gateway(TWO_CLIENTS, env)
    # classes: low 0, normal 1, high 2
    assert await gw.tenant_of(KEY_A) == ("team-a", 2)
    assert await gw.tenant_of(KEY_B) == ("team-b", 0)  # by its SHA-256 in the file
    assert await gw.tenant_of("env-key-1") == ("key-1", 2)  # BALANCER_API_KEYS alongside
    assert await gw.tenant_of("env-key-2") == ("key-2", 1)  # no class: the default
    status, _ = await gw.chat(KEY_A, bearer=True)
    assert status == 200
    tenant = gw.seen[0].tenant
    assert (tenant.weight, tenant.key_class) == (2.0, "high")
    for wrong in ("nope", KEY_A + "x", sha(KEY_B)):  # the digest itself is no key
        assert_401(*await gw.chat(wrong), "Incorrect API key provided.")
    assert_401(*await gw.chat(), "You didn't provide an API key.")
    # The other client routes too: models, and stored responses by id.
    assert_401(*await gw.call("/v1/models", method="GET"))
    assert (await gw.call("/v1/models", KEY_B, method="GET"))[0] == 200
    assert_401(*await gw.call("/v1/responses/resp_x", "nope", method="GET"))
    status, body = await gw.call("/v1/responses/resp_x", KEY_A, method="GET")
    assert status == 404, body  # through the key check: an unknown id


async def test_open_without_any_key(gateway: GatewayFactory) -> None:
    gw = await gateway(REGIONS, {})
    assert await gw.tenant_of(None) == ("anonymous", 1)
    assert await gw.tenant_of("anything") == ("anonymous", 1)
    assert gw.seen[0].tenant is ANONYMOUS


async def test_reload_adds_removes_and_rotates_keys(gateway: GatewayFactory,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No restart: the table of keys is rebuilt from the new file, and BALANCER_API_KEYS is
    read from the environment again (os.environ, as `balancer serve` does)."""
    monkeypatch.setenv("TEAM_A_KEY", KEY_A)
    monkeypatch.setenv("BALANCER_API_KEYS", "env-old")
    gw = await gateway(TWO_CLIENTS)
    assert await gw.tenant_of(KEY_A) == ("team-a", 2)
    assert await gw.tenant_of("env-old") == ("key-1", 1)

    # team-a's key rotated (its variable), team-b removed, team-c added, class changed;
    # BALANCER_API_KEYS changed too.
    monkeypatch.setenv("TEAM_A_KEY", KEY_A2)
    monkeypatch.setenv("BALANCER_API_KEYS", "env-new#low")
    await reload(gw, clients_yaml("{name: team-a, key: '${TEAM_A_KEY}', class: normal}",
                                  f"{{name: team-c, key_sha256: {sha(KEY_C)}}}"))
    assert_401(*await gw.chat(KEY_A))
    assert_401(*await gw.chat(KEY_B))
    assert_401(*await gw.chat("env-old"))
    assert await gw.tenant_of(KEY_A2) == ("team-a", 1)
    assert await gw.tenant_of(KEY_C) == ("team-c", 1)
    assert await gw.tenant_of("env-new") == ("key-1", 0)

    # A refused file changes nothing.
    gw.reloader.path.write_text(clients_yaml("{name: team-a, key: k1}", "{name: x, key: k1}"))
    assert not await gw.reloader.reload("test")
    assert await gw.tenant_of(KEY_C) == ("team-c", 1)

    # Every key gone: open again.
    monkeypatch.delenv("BALANCER_API_KEYS")
    await reload(gw, REGIONS)
    assert await gw.tenant_of(None) == ("anonymous", 1)


async def test_the_first_matching_key_decides(gateway: GatewayFactory) -> None:
    """A key both a client's and in BALANCER_API_KEYS: the client's settings apply."""
    gw = await gateway(TWO_CLIENTS, {"TEAM_A_KEY": KEY_A, "BALANCER_API_KEYS": KEY_A})
    assert await gw.tenant_of(KEY_A) == ("team-a", 2)


# --------------------------------------------------------------------------- admin keys


async def test_admin_keys_guard_regions_and_metrics(gateway: GatewayFactory) -> None:
    env = {"TEAM_A_KEY": KEY_A, "BALANCER_API_KEYS": "env-key",
           "BALANCER_ADMIN_KEYS": f"{ADMIN}, adm-second"}
    gw = await gateway(TWO_CLIENTS, env)
    for path in ("/regions", "/metrics"):
        assert_401(*await gw.call(path, method="GET"), "needs an admin key")
        for client_key in (KEY_A, KEY_B, "env-key"):  # a client key is no admin key
            assert_401(*await gw.call(path, client_key, method="GET"),
                       "client keys are not admin keys")
        for key, bearer in ((ADMIN, False), (ADMIN, True), ("adm-second", False)):
            status, body = await gw.call(path, key, method="GET", bearer=bearer)
            assert status == 200, (path, body)
        assert "balancer_requests_total" in (await gw.call("/metrics", ADMIN, method="GET"))[1]
    # An admin key is no client key.
    assert_401(*await gw.chat(ADMIN), "Incorrect API key provided.")
    assert_401(*await gw.call("/v1/models", ADMIN, method="GET"))
    for path in ("/healthz", "/readyz"):  # probes stay open
        assert (await gw.call(path, method="GET"))[0] == 200
    # ... unless it is also listed as a client key.
    env["BALANCER_API_KEYS"] = f"env-key,{ADMIN}"
    await reload(gw, TWO_CLIENTS)
    assert await gw.tenant_of(ADMIN) == ("key-2", 1)


async def test_admin_keys_without_client_keys(gateway: GatewayFactory) -> None:
    """Admin keys alone guard the admin routes; the API stays open."""
    gw = await gateway(REGIONS, {"BALANCER_ADMIN_KEYS": ADMIN})
    assert await gw.tenant_of(None) == ("anonymous", 1)
    assert_401(*await gw.call("/metrics", method="GET"))
    assert_401(*await gw.call("/regions", "anything", method="GET"))
    assert (await gw.call("/regions", ADMIN, method="GET"))[0] == 200


async def test_without_admin_keys_as_before(gateway: GatewayFactory) -> None:
    """No BALANCER_ADMIN_KEYS: /metrics open, /regions needs a client key if any exists."""
    env = {"TEAM_A_KEY": KEY_A}
    gw = await gateway(TWO_CLIENTS, env)
    assert (await gw.call("/metrics", method="GET"))[0] == 200
    assert_401(*await gw.call("/regions", method="GET"))
    assert (await gw.call("/regions", KEY_B, method="GET"))[0] == 200
    # Admin keys set later apply at the next reload, read from the environment again.
    env["BALANCER_ADMIN_KEYS"] = ADMIN
    await reload(gw, TWO_CLIENTS)
    assert_401(*await gw.call("/metrics", method="GET"))
    assert_401(*await gw.call("/regions", KEY_B, method="GET"))
    assert (await gw.call("/metrics", ADMIN, method="GET"))[0] == 200
    del env["BALANCER_ADMIN_KEYS"]
    await reload(gw, TWO_CLIENTS)
    assert (await gw.call("/metrics", method="GET"))[0] == 200
    assert (await gw.call("/regions", KEY_A, method="GET"))[0] == 200


# --------------------------------------------------------------------------- constant time


def test_every_key_is_compared_every_time(digest_comparisons: list[tuple[int, int]]) -> None:
    """Config clients (plain and SHA-256), BALANCER_API_KEYS and admin keys: every one
    compared as a 32-byte digest, whichever matched (or none)."""
    cfg = config_mod.parse(TWO_CLIENTS, "t.yaml", {"TEAM_A_KEY": KEY_A})
    app = create_app(cfg, env={"BALANCER_API_KEYS": "e1,e2#high",
                               "BALANCER_ADMIN_KEYS": "a1,a2,a3"})
    rt = app[RUNTIME]
    assert len(rt.keys.digests) == len(rt.keys.tenants) == 4 and len(rt.keys.admin) == 3
    calls = digest_comparisons
    for headers, tenant in [({"api-key": KEY_A}, "team-a"), ({"api-key": KEY_B}, "team-b"),
                            ({"Authorization": "Bearer e2"}, "key-2"), ({"api-key": "x"}, None),
                            ({"api-key": "a1"}, None), ({}, None)]:
        calls.clear()
        request = make_mocked_request("POST", "/v1/chat/completions", headers=headers)
        try:
            got: Tenant | None = authorize(request, rt)
        except ClientError as exc:
            assert exc.status == 401
            got = None
        assert (got.name if got else None) == tenant, headers
        assert calls == [(32, 32)] * 4, (headers, calls)
    for headers, ok in [({"api-key": "a3"}, True), ({"api-key": KEY_A}, False), ({}, False)]:
        calls.clear()
        request = make_mocked_request("GET", "/metrics", headers=headers)
        try:
            authorize_admin(request, rt)
            allowed = True
        except ClientError as exc:
            assert exc.status == 401
            allowed = False
        assert allowed is ok, headers
        assert calls == [(32, 32)] * 3, (headers, calls)


def test_the_key_table_shows_no_key() -> None:
    cfg = config_mod.parse(TWO_CLIENTS, "t.yaml", {"TEAM_A_KEY": KEY_A})
    rt = create_app(cfg, env={"BALANCER_API_KEYS": "env-secret", "BALANCER_ADMIN_KEYS": ADMIN}
                    )[RUNTIME]
    text = repr(rt.keys) + repr(cfg) + repr(cfg.clients)
    for secret in (KEY_A, KEY_B, "env-secret", ADMIN, sha(KEY_B)):
        assert secret not in text
    assert isinstance(rt.keys, KeyTable)
    assert [t.name for t in rt.keys.tenants] == ["team-a", "team-b", "key-1"]
