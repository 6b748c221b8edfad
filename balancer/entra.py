"""Microsoft Entra ID bearer tokens for regions with `auth: entra` (Azure OpenAI resources
with key auth disabled, `disableLocalAuth`), from a managed identity or, in development,
environment credentials or the Azure CLI: whatever `DefaultAzureCredential` finds.

One credential per distinct `entra_client_id`, shared by every region naming it, created
on first use (after the environment is final) and closed with the app.

Caching and refresh. Each `Identity` keeps the last token (`get_token_info`: token,
`expires_on`, `refresh_on`) and hands it out until its refresh time: `refresh_on`, else
5 minutes before `expires_on` (as azure-core's BearerTokenCredentialPolicy does), or
half its remaining life for a shorter token. Then one request fetches, under a lock with
a double check, while the others keep the still-valid token; a failed refresh keeps it
too, retried after a pause. Why a cache here and not only the library's:
- the Azure CLI, azd and PowerShell credentials cache nothing (azure-identity 1.27,
  aio/_credentials/azure_cli.py `get_token`: "applications calling this method directly
  must also handle token caching"), so without it development would run `az` per request;
- azure-core's `get_bearer_token_provider` caches, but costs ~15 µs a call, and for a
  token living under its 5-minute window it calls the credential on every request;
  this hot path is a clock read.
Below it, the managed identity credential keeps its own cache (an MSAL TokenCache):
`get_cached_token` (azure/identity/_internal/managed_identity_client.py) returns the
token while unexpired and before its `refresh_on` (set at half life for tokens of 2 h
or more), and `get_refresh_status` (aio/_internal/get_token_mixin.py) requests a new one
only when there is none, or within 5 minutes of expiry at most every 30 s, keeping the
cached one if that early request fails. So a token is fetched about once per lifetime
per identity, never per request.

The token is kept and handed out as a `Secret`: it never shows in a repr, a log line, a
metric or an error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from balancer.config import Region, Secret

log = logging.getLogger("balancer.entra")

SCOPE = "https://cognitiveservices.azure.com/.default"
TOKEN_TIMEOUT_SECONDS = 10.0  # a hung identity endpoint must not hold requests for long
FAILURE_BACKOFF_SECONDS = 2.0  # after a failed fetch, fail fast: no fetch storm per request
MIN_FORCED_REFRESH_SECONDS = 10.0  # a 401 right after a forced refresh is no stale token
RETIRE_GRACE_SECONDS = 30.0  # a replaced credential may be finishing a fetch
REFRESH_WINDOW_SECONDS = 300.0  # renew this long before expiry, as azure-core does
WARN_EVERY_SECONDS = 30.0  # one warning per identity and problem kind this often

# client id -> an async credential with get_token_info (AsyncSupportsTokenInfo) and close
CredentialFactory = Callable[[str | None], Any]


class AuthError(Exception):
    """No token for a region now. The message names the credential's error, never a
    token: managed identity masks `access_token` in the one error that echoes a reply
    (managed_identity_client.py, `_process_response`); the others describe failures."""


def default_credential(client_id: str | None) -> Any:
    """`DefaultAzureCredential` with its defaults; `client_id` selects a user-assigned
    managed identity (None: AZURE_CLIENT_ID if set, else the system-assigned one)."""
    from azure.identity.aio import DefaultAzureCredential  # ~0.5 s to import: only if used

    if client_id is None:
        return DefaultAzureCredential()
    return DefaultAzureCredential(managed_identity_client_id=client_id)


def describe(exc: BaseException) -> str:
    """The exception on one bounded line. DefaultAzureCredential's message lists every
    source it tried, over many lines: the ones that were merely unavailable (and the
    troubleshooting links) are left out when another says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines[1:] if "unavailable" not in line
               and "troubleshoot" not in line and line != "Attempted credentials:"]
    text = " ".join(" ".join(lines[:1] + telling if telling else lines).split())
    if len(text) > 600:
        text = text[:600] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Identity:
    """One credential and the token it last gave (module docstring)."""

    def __init__(self, client_id: str | None, factory: CredentialFactory, seconds: float):
        self.client_id = client_id
        self.seconds = seconds  # longest wait for a token
        self.label = client_id or "default"  # for messages: the client id, never a token
        self._factory = factory
        self._credential: Any = None
        self._token: Secret | None = None
        self._expires_on = 0.0  # unix seconds, as tokens say
        self._refresh_at = 0.0  # unix seconds: hand out `_token` until then
        self._lock = asyncio.Lock()  # one fetch at a time
        self._failed_until = -math.inf  # monotonic: no fetch before, after a failure
        self._failure = ""
        self._refreshed_at = -math.inf  # monotonic: the last forced refresh
        self._retired: list[tuple[float, Any]] = []

    async def token(self) -> Secret:
        token = self._token
        if token is not None and time.time() < self._refresh_at:
            return token
        if token is not None and self._lock.locked() and time.time() < self._expires_on:
            return token  # being renewed: this one still works meanwhile
        async with self._lock:
            token = self._token
            if token is not None and time.time() < self._refresh_at:
                return token  # renewed while this request waited
            if time.monotonic() < self._failed_until:  # the last fetch failed just now
                if token is not None and self._valid():
                    return token
                raise AuthError(self._failure)
            return await self._fetch()

    async def refresh(self, stale: Secret) -> Secret | None:
        """A token other than `stale` (which a region refused), or None when there is no
        point retrying: a forced refresh just happened, or gave the same token back.

        azure-identity has no public way to skip its caches for every source: `claims`
        makes managed identity skip its cache (`get_cached_token` returns None), but it
        is a claims challenge that MSAL-based sources send to Entra and the CLI
        credentials refuse. A new credential starts with empty caches whatever its
        source, so a forced refresh replaces the credential; the old one is closed once
        a fetch it may be running has had time to finish."""
        async with self._lock:  # one refresh for a burst of 401s
            token = self._token
            if token is not None and token != stale and self._valid():
                return token  # renewed meanwhile (by another request, or on time)
            now = time.monotonic()
            if now - self._refreshed_at < MIN_FORCED_REFRESH_SECONDS:
                return None
            self._refreshed_at = now
            await self._close_retired(now - RETIRE_GRACE_SECONDS)
            if self._credential is not None:
                self._retired.append((now, self._credential))
            self._credential, self._token, self._refresh_at = None, None, 0.0
            fresh = await self._fetch()
            return None if fresh == stale else fresh

    async def close(self) -> None:
        if self._credential is not None:
            self._retired.append((0.0, self._credential))
        self._credential, self._token, self._refresh_at = None, None, 0.0
        await self._close_retired(math.inf)

    def _valid(self) -> bool:
        return self._token is not None and time.time() < self._expires_on

    async def _fetch(self) -> Secret:
        """A token from the credential (the lock held)."""
        try:
            if self._credential is None:
                self._credential = self._factory(self.client_id)
            async with asyncio.timeout(self.seconds):
                info = await self._credential.get_token_info(SCOPE)
        except Exception as exc:  # whatever a credential raises, no token from it now
            self._failure = f"no token within {self.seconds:g} s" \
                if isinstance(exc, TimeoutError) else describe(exc)
            self._failed_until = time.monotonic() + FAILURE_BACKOFF_SECONDS
            if self._token is not None and self._valid():  # keep it; try again later
                self._refresh_at = min(time.time() + FAILURE_BACKOFF_SECONDS, self._expires_on)
                return self._token
            raise AuthError(self._failure) from None
        self._failed_until = -math.inf
        now = time.time()
        self._token, self._expires_on = Secret(info.token), float(info.expires_on)
        early = self._expires_on - min(REFRESH_WINDOW_SECONDS, (self._expires_on - now) / 2)
        self._refresh_at = min(info.refresh_on or math.inf, early)
        return self._token

    async def _close_retired(self, before: float) -> None:
        keep = []
        for at, credential in self._retired:
            if at <= before:
                with contextlib.suppress(Exception):  # closing: nothing left to save
                    await credential.close()
            else:
                keep.append((at, credential))
        self._retired = keep


class EntraAuth:
    """The tokens of every `auth: entra` region, one `Identity` per client id. Kept on
    the Runtime; survives reloads, so a reload keeps the tokens of unchanged identities."""

    def __init__(self, factory: CredentialFactory = default_credential,
                 seconds: float = TOKEN_TIMEOUT_SECONDS):
        self.factory = factory
        self.seconds = seconds
        self.identities: dict[str | None, Identity] = {}
        self._warned: dict[tuple[str, str], float] = {}  # (region, kind) -> last warning

    def identity(self, region: Region) -> Identity:
        found = self.identities.get(region.entra_client_id)
        if found is None:
            found = self.identities[region.entra_client_id] = Identity(
                region.entra_client_id, self.factory, self.seconds)
        return found

    async def token(self, region: Region) -> Secret | None:
        """The region's bearer token, or None for a key region. Raises AuthError."""
        if region.auth != "entra":
            return None
        identity = self.identity(region)
        try:
            return await identity.token()
        except AuthError as exc:
            self._warn(region, "token", "region %s: no Microsoft Entra token from identity "
                       "%s (%s); the attempt counts as the region's failure",
                       region.name, identity.label, exc)
            raise

    async def refresh(self, region: Region, stale: Secret) -> Secret | None:
        """After the region answered 401 to `stale`: a fresh token to retry with, or None
        (Identity.refresh). Raises AuthError."""
        identity = self.identity(region)
        try:
            return await identity.refresh(stale)
        except AuthError as exc:
            self._warn(region, "token", "region %s: no Microsoft Entra token from identity "
                       "%s after a 401 (%s)", region.name, identity.label, exc)
            raise

    def refused(self, region: Region) -> None:
        """The region answered 401 to a refreshed token: not a stale token, so likely a
        missing role assignment (say which region and identity, never the token)."""
        identity = self.identity(region)
        self._warn(region, "refused", "region %s answered 401 to a fresh Microsoft Entra "
                   "token of identity %s: does it have the Cognitive Services OpenAI User "
                   "role on the resource?", region.name, identity.label)

    async def close(self) -> None:
        for identity in self.identities.values():
            await identity.close()
        self.identities.clear()

    def _warn(self, region: Region, kind: str, message: str, *args: Any) -> None:
        key = (region.name, kind)
        now = time.monotonic()
        if now - self._warned.get(key, -math.inf) >= WARN_EVERY_SECONDS:
            self._warned[key] = now
            log.warning(message, *args)


async def probe(regions: Iterable[Region], factory: CredentialFactory = default_credential,
                seconds: float = 5.0) -> list[tuple[Region, str]]:
    """Try to get a token for each `auth: entra` region (`balancer check`): the regions
    whose credential cannot get one (within `seconds`), with the reason."""
    auth = EntraAuth(factory, seconds)
    problems = []
    try:
        for region in regions:
            if region.auth != "entra":
                continue
            try:
                await auth.identity(region).token()
            except AuthError as exc:
                problems.append((region, str(exc)))
    finally:
        await auth.close()
    return problems
