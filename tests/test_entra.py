"""`auth: entra` regions: Microsoft Entra ID tokens instead of keys, with the real
azure-identity (`DefaultAzureCredential`, its defaults) against a local managed identity
endpoint (balancer.sim.identity, the App Service protocol) and simulated regions that
refuse keys and check the tokens' signature, audience and expiry."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from balancer import config as config_mod
from balancer import entra as entra_mod
from balancer import sim
from balancer.cli import main as cli_main
from balancer.config import Config
from balancer.gateway import create_app
from balancer.gateway.runtime import RUNTIME
from balancer.protocol import GatewayRunner
from balancer.sim import identity
from balancer.sim.identity import IdentityEndpoint, start_identity
from tests.conftest import StackFactory, free_port

SECRET = "sim-entra-secret"
CID_A = "11111111-1111-4111-8111-111111111111"
CID_BROKEN = "22222222-2222-4222-8222-222222222222"
CHAT = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi there."}], "max_tokens": 8}
WAIT = {"x-balancer-max-wait-ms": "10000"}


def entra_yaml(*regions: tuple[str, str | None, int]) -> str:
    """(name, client id or None, priority) each; dated and v1 route styles alternate."""
    lines = ["regions:"]
    for i, (name, client_id, priority) in enumerate(regions):
        version = "v1" if i % 2 == 0 else '"2024-06-01"'
        lines += [f"  - name: {name}", "    kind: azure", "    endpoint: http://placeholder",
                  "    auth: entra", f"    api_version: {version}", f"    priority: {priority}",
                  "    deployments:", "      gpt-4: {deployment: gpt-4-dep, tpm: 600000}"]
        if client_id:
            lines.insert(-2, f"    entra_client_id: {client_id}")
    return "\n".join(lines) + "\n"


def entra_config(*regions: tuple[str, str | None, int], **gateway: Any) -> Config:
    cfg = config_mod.parse(entra_yaml(*regions), "entra.yaml", {})
    return replace(cfg, gateway=replace(cfg.gateway, **gateway))


@pytest.fixture
async def idp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[IdentityEndpoint]:
    """The managed identity endpoint, in the environment as App Service sets it."""
    endpoint = IdentityEndpoint(secret=SECRET, lifetime_seconds=3600)
    runner, url = await start_identity(endpoint)
    for name in ("IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "MSI_ENDPOINT", "MSI_SECRET",
                 "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
                 "AZURE_FEDERATED_TOKEN_FILE", "AZURE_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IDENTITY_ENDPOINT", url)
    monkeypatch.setenv("IDENTITY_HEADER", endpoint.header)
    # azure-identity's own switch: never fall through to `az` or PowerShell on this machine
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "ManagedIdentityCredential")
    yield endpoint
    await runner.cleanup()


@dataclass
class EntraStack:
    sim_url: str
    url: str
    app: web.Application

    async def chat(self, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        async with aiohttp.ClientSession() as s, s.post(
                f"{self.url}/v1/chat/completions", json=CHAT, headers=headers or WAIT) as r:
            return r.status, r.headers.get("x-balancer-region", ""), await r.read()

    async def unauthorized(self) -> dict[str, int]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.sim_url}/_sim/stats") as r:
            return {name: c["unauthorized"] for name, c in (await r.json())["auth"].items()}

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(f"{self.url}/metrics") as r:
            return await r.text()

    async def knobs(self, region: str, **knobs: Any) -> None:
        async with aiohttp.ClientSession() as s, s.post(
                f"{self.sim_url}/_sim/regions/{region}", json=knobs) as r:
            assert r.status == 200, await r.text()


@pytest.fixture
async def entra(idp: IdentityEndpoint) -> AsyncIterator[Callable[..., Awaitable[EntraStack]]]:
    """Simulated Entra-only regions (tokens valid `skew` seconds past expiry) and a gateway
    calling them with `auth: entra`."""
    runners: list[web.AppRunner] = []

    async def start(cfg: Config, *, skew: float = 1.0) -> EntraStack:
        sim_cfg = sim.simulator_config(cfg, seed=3, keyed=False, latency_base_ms=0.0,
                                       latency_per_token_ms=0.0)
        sim_cfg.regions = [replace(r, auth="entra") for r in sim_cfg.regions]
        sim_cfg.entra_secret, sim_cfg.entra_clock_skew_seconds = SECRET, skew
        sim_runner, sim_url = await sim.start(sim_cfg)
        runners.append(sim_runner)
        cfg = replace(cfg, regions=tuple(replace(r, endpoint=f"{sim_url}/{r.name}")
                                         for r in cfg.regions))
        app = create_app(cfg, api_keys=())
        runner = GatewayRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return EntraStack(sim_url, f"http://127.0.0.1:{port}", app)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


def assert_no_token(idp: IdentityEndpoint, *texts: str | bytes) -> None:
    assert idp.tokens
    for text in texts:
        text = text.decode(errors="replace") if isinstance(text, bytes) else text
        for token in idp.tokens:
            assert token not in text
            assert token.rsplit(".", 1)[-1] not in text  # not even its signature


# -- configuration -------------------------------------------------------------------------


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(text, "r.yaml", {})
    return info.value.problems


def test_config_auth_settings() -> None:
    cfg = config_mod.parse(entra_yaml(("a", CID_A, 0), ("b", None, 0)), "r.yaml", {})
    assert [(r.auth, r.entra_client_id, r.api_key) for r in cfg.regions] == [
        ("entra", CID_A, None), ("entra", None, None)]
    key = config_mod.parse(entra_yaml(("a", None, 0)).replace("auth: entra", "api_key: k"),
                           "r.yaml", {})
    assert key.regions[0].auth == "key"
    with_key = entra_yaml(("a", None, 0)).replace("auth: entra", "auth: entra\n    api_key: k")
    assert problems(with_key) == [
        ("regions[0].api_key", "remove api_key: entra regions send a bearer token")]
    openai = entra_yaml(("a", None, 0)).replace("kind: azure", "kind: openai")
    assert problems(openai) == [
        ("regions[0].auth", "entra is only for kind azure (kind openai takes an api_key)")]
    keyed = entra_yaml(("a", CID_A, 0)).replace("auth: entra", "api_key: k")
    assert problems(keyed) == [("regions[0].entra_client_id", "is only for auth: entra")]
    assert problems(entra_yaml(("a", "not-a-guid", 0))) == [
        ("regions[0].entra_client_id", "must be a client ID (a GUID), got 'not-a-guid'")]
    assert problems(entra_yaml(("a", None, 0)).replace("auth: entra", "auth: mtls")) == [
        ("regions[0].auth", "must be one of key, entra, got 'mtls'")]


# -- the gateway ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_load_with_short_lived_tokens(entra: Any, idp: IdentityEndpoint) -> None:
    """200 requests over ~6 s of 3 s tokens: every one served, no 401 upstream, one
    credential per identity, a handful of tokens each (a fetch per lifetime)."""
    idp.lifetime_seconds = 3
    s = await entra(entra_config(("east", CID_A, 0), ("west", CID_A, 0), ("north", None, 0)))
    results: list[tuple[int, str, bytes]] = []
    started = time.monotonic()
    for _ in range(5):
        results += await asyncio.gather(*(s.chat() for _ in range(40)))
        await asyncio.sleep(1.5)
    elapsed = time.monotonic() - started
    assert [status for status, _, _ in results] == [200] * 200
    assert {region for _, region, _ in results} == {"east", "west", "north"}
    assert await s.unauthorized() == {"east": 0, "west": 0, "north": 0}
    issued = dict(idp.issued)
    print(f"\nentra load: {len(results)} requests in {elapsed:.1f} s, tokens issued {issued}, "
          f"upstream 401s 0")
    assert set(issued) == {CID_A, identity.SYSTEM}
    assert all(2 <= n <= 5 for n in issued.values()), issued  # renewed, never per request
    assert set(s.app[RUNTIME].auth.identities) == {CID_A, None}  # east and west share one


async def test_an_expired_token_is_replaced(entra: Any, idp: IdentityEndpoint) -> None:
    idp.lifetime_seconds = 2
    s = await entra(entra_config(("east", None, 0)), skew=0.0)
    assert (await s.chat())[0] == 200
    first = idp.tokens[-1]
    await asyncio.sleep(2.2)
    async with aiohttp.ClientSession() as session, session.post(  # the old one is refused now
            f"{s.sim_url}/east/openai/v1/chat/completions",
            json={**CHAT, "model": "gpt-4-dep"},
            headers={"Authorization": f"Bearer {first}"}) as r:
        assert r.status == 401 and (await r.json())["error"]["message"] == identity.BAD_TOKEN
    assert (await s.chat())[0] == 200
    assert idp.issued[identity.SYSTEM] == 2
    assert await s.unauthorized() == {"east": 1}  # the probe above; none from the gateway


async def test_a_rotated_key_forces_one_refresh_and_one_retry(
        entra: Any, idp: IdentityEndpoint, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = await entra(entra_config(("east", CID_A, 0)))
    assert (await s.chat())[0] == 200
    idp.secret = "rotated"  # the identity signs with a new key: cached tokens are refused
    await s.knobs("east", entra_secret="rotated")
    results = await asyncio.gather(*(s.chat() for _ in range(20)))
    assert {(status, region) for status, region, _ in results} == {(200, "east")}
    assert idp.issued[CID_A] == 2  # one refresh for the whole burst of 401s
    assert 1 <= (await s.unauthorized())["east"] <= 20
    metrics = await s.metrics()
    assert "balancer_upstream_errors_total{" not in metrics  # retried within the attempt
    assert_no_token(idp, caplog.text, metrics, *(body for _, _, body in results))


async def test_a_401_to_a_fresh_token_is_a_region_failure(
        entra: Any, idp: IdentityEndpoint, caplog: pytest.LogCaptureFixture) -> None:
    """A region that refuses even a fresh token (no role assignment): one refresh, then
    failures that open its circuit; the requests are served by the next region."""
    s = await entra(entra_config(("bad", CID_A, 0), ("good", CID_A, 1), circuit_failures=2))
    await s.knobs("bad", entra_secret="not-the-identity-key")
    results = [await s.chat() for _ in range(6)]
    assert {(status, region) for status, region, _ in results} == {(200, "good")}
    # 1st: stale 401, refresh, 401 again; 2nd: 401, no new refresh (just done); then open
    assert (await s.unauthorized())["bad"] == 3
    assert idp.issued[CID_A] == 2
    metrics = await s.metrics()
    assert ('balancer_upstream_errors_total{model="gpt-4",reason="status_4xx",region="bad"} '
            '2.0') in metrics
    assert f"region bad answered 401 to a fresh Microsoft Entra token of identity {CID_A}" \
        in caplog.text
    assert_no_token(idp, caplog.text, metrics, *(body for _, _, body in results))


async def test_a_credential_without_token_fails_its_region_only(
        entra: Any, idp: IdentityEndpoint, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    idp.refuse.add(CID_BROKEN)  # no such identity on this host
    s = await entra(entra_config(("broken", CID_BROKEN, 0), ("fine", None, 1)))
    status, region, _ = await s.chat()
    assert (status, region) == (200, "fine")
    metrics = await s.metrics()
    assert ('balancer_upstream_errors_total{model="gpt-4",reason="auth",region="broken"} 1.0'
            in metrics)
    assert (f"region broken: no Microsoft Entra token from identity {CID_BROKEN} "
            "(ClientAuthenticationError: DefaultAzureCredential failed") in caplog.text
    assert "Unable to load the proper Managed Identity" in caplog.text
    alone = await entra(entra_config(("broken", CID_BROKEN, 0), max_attempts=1))
    status, region, body = await alone.chat()
    assert (status, region) == (502, "broken")
    assert b'"code": "auth"' in body or b'"code":"auth"' in body
    assert await s.unauthorized() == {"broken": 0, "fine": 0}  # nothing was sent without one
    assert_no_token(idp, caplog.text, metrics, body, repr(s.app[RUNTIME].config))


async def test_calls_on_a_stored_response_carry_the_token(
        entra: Any, idp: IdentityEndpoint) -> None:
    s = await entra(entra_config(("east", None, 0)))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{s.url}/v1/responses", json={
                "model": "gpt-4", "input": "Hi.", "max_output_tokens": 16}) as r:
            assert r.status == 200, await r.text()
            response_id = (await r.json())["id"]
        async with session.get(f"{s.url}/v1/responses/{response_id}") as r:
            assert r.status == 200
        idp.secret = "rotated"
        await s.knobs("east", entra_secret="rotated")
        async with session.get(f"{s.url}/v1/responses/{response_id}") as r:
            assert r.status == 200  # a 401, a refresh, the same call again
    assert idp.issued[identity.SYSTEM] == 2
    assert await s.unauthorized() == {"east": 1}


async def test_simulate_makes_entra_regions_key_regions(stack: StackFactory) -> None:
    cfg = entra_config(("east", CID_A, 0))
    twin = sim.with_simulated_endpoints(cfg, "http://sim")
    assert (twin.regions[0].auth, twin.regions[0].entra_client_id) == ("key", None)
    s = await stack(cfg)  # what `serve --simulate` runs: no identity endpoint needed
    async with aiohttp.ClientSession() as session, session.post(
            f"{s.url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200


# -- balancer check ------------------------------------------------------------------------


async def test_check_gets_a_token_for_each_entra_region(
        tmp_path: Any, capsys: pytest.CaptureFixture[str], idp: IdentityEndpoint) -> None:
    idp.refuse.add(CID_BROKEN)
    good = tmp_path / "good.yaml"
    good.write_text(entra_yaml(("ok", None, 0), ("also", CID_A, 0)))
    bad = tmp_path / "bad.yaml"
    bad.write_text(entra_yaml(("ok", None, 0), ("broken", CID_BROKEN, 0)))
    # `check` runs its own event loop; this one keeps serving the identity endpoint
    assert await asyncio.to_thread(cli_main, ["check", str(good)]) == 0
    assert await asyncio.to_thread(cli_main, ["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert (f"{bad}: regions[1].auth: region broken: cannot get a Microsoft Entra token "
            f"from identity {CID_BROKEN}: ClientAuthenticationError: ") in err
    assert "regions[0]" not in err
    issued = sum(idp.issued.values())
    assert await asyncio.to_thread(cli_main, ["check", "--simulate", str(bad)]) == 0
    assert sum(idp.issued.values()) == issued  # simulating: no token asked for
    assert_no_token(idp, err)


# -- the simulator's Entra-only regions ----------------------------------------------------


async def test_sim_region_with_key_auth_disabled() -> None:
    region = sim.SimRegion("east", [sim.SimDeployment("gpt-4", 600_000)], auth="entra",
                           latency_base_ms=0, latency_per_token_ms=0)
    runner, url = await sim.start(sim.SimConfig([region], entra_secret=SECRET,
                                                 entra_clock_skew_seconds=0))
    now = int(time.time())
    valid = identity.issue(SECRET, CID_A, now + 60, 1)
    cases = [
        ({"api-key": "any"}, identity.KEY_DISABLED),
        ({}, identity.BAD_TOKEN),
        ({"Authorization": f"Bearer {identity.issue('other', CID_A, now + 60, 2)}"},
         identity.BAD_TOKEN),
        ({"Authorization": f"Bearer {identity.issue(SECRET, CID_A, now - 5, 3)}"},
         identity.BAD_TOKEN),
        ({"Authorization": "Bearer " + identity.issue(SECRET, CID_A, now + 60, 4,
                                                      audience="https://example.com")},
         identity.BAD_TOKEN),
        ({"Authorization": f"Bearer {valid}", "api-key": "ignored"}, None),
    ]
    try:
        async with aiohttp.ClientSession() as s:
            for path in ("openai/v1/chat/completions",
                         "openai/deployments/gpt-4/chat/completions?api-version=2024-06-01"):
                for headers, message in cases:
                    async with s.post(f"{url}/east/{path}", json={**CHAT, "model": "gpt-4"},
                                      headers=headers) as r:
                        if message is None:
                            assert r.status == 200, await r.text()
                        else:
                            assert r.status == 401
                            assert (await r.json())["error"]["message"] == message
            async with s.get(f"{url}/_sim/stats") as r:
                assert (await r.json())["auth"]["east"] == {
                    "unauthorized": 10, "key_disabled": 2, "missing": 2, "invalid_token": 4,
                    "expired_token": 2}
            async with s.get(f"{url}/_sim/regions/east") as r:
                knobs = await r.json()
            assert knobs["auth"] == "entra" and "entra_secret" not in knobs
    finally:
        await runner.cleanup()


# -- the token cache, with a credential of our own -----------------------------------------


SERIAL = itertools.count(1)  # tokens differ across credentials, as real ones do


class FakeCredential:
    """Counts fetches; each gives a new token living `lifetime` seconds, or raises."""

    def __init__(self, lifetime: float = 3600.0) -> None:
        self.lifetime, self.fetches, self.fail, self.delay = lifetime, 0, False, 0.0
        self.closed = False

    async def get_token_info(self, *scopes: str) -> Any:
        from azure.core.credentials import AccessTokenInfo
        from azure.core.exceptions import ClientAuthenticationError

        assert scopes == (entra_mod.SCOPE,)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ClientAuthenticationError("no identity here")
        self.fetches += 1
        return AccessTokenInfo(f"token-{next(SERIAL)}", int(time.time() + self.lifetime))

    async def close(self) -> None:
        self.closed = True


async def test_token_cache_fetches_once_and_keeps_a_valid_token() -> None:
    made: list[FakeCredential] = []

    def factory(client_id: str | None) -> FakeCredential:
        # Renewed after half its life; expires_on is whole seconds (up to 1 s less).
        made.append(FakeCredential(lifetime=4.0))
        made[-1].delay = 0.05
        return made[-1]

    auth = entra_mod.EntraAuth(factory, seconds=1.0)
    region = entra_config(("east", CID_A, 0)).regions[0]
    tokens = await asyncio.gather(*(auth.token(region) for _ in range(100)))
    first = tokens[0].reveal()
    assert {t.reveal() for t in tokens} == {first} and made[0].fetches == 1
    assert "token" not in repr(tokens[0]) and "token" not in str(tokens[0])
    await asyncio.sleep(2.1)  # due for renewal, still valid: a failed renewal keeps it
    made[0].fail = True
    assert (await auth.token(region)).reveal() == first
    made[0].fail = False
    fresh = await auth.refresh(region, tokens[0])  # a 401: a new credential, a new token
    assert fresh is not None and fresh.reveal() != first and len(made) == 2
    assert await auth.refresh(region, fresh) is None  # again at once: not worth it
    await auth.close()
    assert all(c.closed for c in made)


async def test_token_cache_failures_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(entra_mod, "FAILURE_BACKOFF_SECONDS", 0.3)
    credential = FakeCredential()
    credential.fail = True
    calls = 0
    real = credential.get_token_info

    async def counted(*scopes: str) -> Any:
        nonlocal calls
        calls += 1
        return await real(*scopes)

    credential.get_token_info = counted  # type: ignore[method-assign]
    auth = entra_mod.EntraAuth(lambda _: credential, seconds=0.2)
    region = entra_config(("east", None, 0)).regions[0]
    for _ in range(3):  # one fetch, then fail fast during the back-off: no fetch storm
        with pytest.raises(entra_mod.AuthError, match="ClientAuthenticationError: no identity"):
            await auth.token(region)
    assert calls == 1
    credential.fail, credential.delay = False, 1.0
    await asyncio.sleep(0.3)
    with pytest.raises(entra_mod.AuthError, match=r"no token within 0\.2 s"):
        await auth.token(region)
    assert calls == 2
    await auth.close()
