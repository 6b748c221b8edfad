"""What each configured client has used and has left, read from the store: GET /clients,
and the per-client budget gauges that GET /metrics refreshes at scrape. Both read the
same rows, so they never disagree.

Only the clients of regions.yaml's `clients` are shown: BALANCER_API_KEYS' key-N tenants
have no budget. A client's models are those it has a budget for; a client with no
budget at all is shown on every configured model (its fair-share demand and usage,
and what it used today and this month). Never a key, nor a key's digest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

from balancer.capacity.base import CapacityStore, ClientState
from balancer.config import Config
from balancer.config.model import Client, ClientBudget
from balancer.gateway.budgets import client_limits
from balancer.gateway.clients import authorize_admin
from balancer.gateway.runtime import RUNTIME
from balancer.metrics import Metrics
from balancer.tenancy import ClientLimits

PERIODS = ("minute", "day", "month")  # the `period` label of the budget gauges


@dataclass(frozen=True, slots=True)
class Row:
    """One client on one model: its budget there (None: none), the limits the store
    applies (None: neither a budget nor fair share, so the store keeps nothing), and
    the store's state of it (None when it keeps nothing)."""

    client: Client
    model: str
    budget: ClientBudget | None
    limits: ClientLimits | None
    state: ClientState | None

    def quotas(self) -> dict[str, int]:
        """period -> configured tokens (tpm for the minute), for the periods set."""
        b = self.budget
        if b is None:
            return {}
        out = {"minute": b.tpm, "day": b.tokens_per_day, "month": b.tokens_per_month}
        return {period: n for period, n in out.items() if n}

    def remaining(self) -> dict[str, int]:
        """period -> tokens left, for the periods set. The minute: the tpm bucket's share
        left times tpm, as the x-ratelimit-remaining-tokens header says
        (budgets.rate_limit_headers); a day or month: the quota less what was used,
        never below 0. Unknown (no state) counts as untouched."""
        out = {}
        for period, quota in self.quotas().items():
            if period == "minute":
                out[period] = self._bucket(quota)
            else:
                used = self.used(period)
                out[period] = max(0, math.floor(quota - used))
        return out

    def used(self, period: str) -> float:
        """Tokens charged within the UTC day ("day") or month ("month")."""
        if self.state is None:
            return 0.0
        return self.state.budget.day_used if period == "day" else self.state.budget.month_used

    def _bucket(self, tpm: int) -> int:
        c = self.limits
        if self.state is None or c is None or c.tokens_capacity <= 0:
            return tpm
        left = max(0.0, min(self.state.budget.tokens, c.tokens_capacity))
        return math.floor(tpm * left / c.tokens_capacity)

    def per_second(self) -> tuple[float, float] | None:
        """(demand, used) in tokens per second of the store's clock, or None when fair
        share is off: each decayed sum holds about one fair window of tokens."""
        c = self.limits
        if c is None or c.fair_window <= 0:
            return None
        if self.state is None:
            return 0.0, 0.0
        return self.state.demand / c.fair_window, self.state.used / c.fair_window


def budgeted_models(client: Client, config: Config) -> list[str]:
    """The models a client has a budget for (the gauges' rows)."""
    return sorted(client.budgets)


def shown_models(client: Client, config: Config) -> list[str]:
    """GET /clients' models: those of its budgets; every configured model when it has
    none (it shares them all)."""
    return sorted(client.budgets) if client.budgets else sorted(config.models)


async def rows(store: CapacityStore, config: Config,
               models_of: Callable[[Client, Config], Iterable[str]] = shown_models
               ) -> list[Row]:
    """Every configured client on each of its models (`models_of`), in config order:
    one store call per model."""
    wanted: dict[str, list[tuple[Client, ClientBudget | None, ClientLimits | None]]] = {}
    for client in config.clients:
        for model in models_of(client, config):
            budget = client.budgets.get(model)
            limits = client_limits(client.name, client.weight, budget, config.gateway,
                                   config.fair_share)
            wanted.setdefault(model, []).append((client, budget, limits))
    found: dict[tuple[str, str], Row] = {}
    for model, entries in wanted.items():
        asked = [limits for _, _, limits in entries if limits is not None]
        states = iter(await store.clients(model, asked) if asked else [])
        for client, budget, limits in entries:
            state = next(states) if limits is not None else None
            found[client.name, model] = Row(client, model, budget, limits, state)
    return [found[client.name, model] for client in config.clients
            for model in models_of(client, config)]


def set_gauges(metrics: Metrics, found: Iterable[Row]) -> None:
    """balancer_client_budget_tokens and balancer_client_budget_remaining_tokens from
    `found`, after clearing both: a client or budget removed by a reload must vanish."""
    budget, remaining = metrics.client_budget, metrics.client_remaining
    budget.clear()
    remaining.clear()
    for row in found:
        left = row.remaining()
        for period, quota in row.quotas().items():
            budget.labels(row.client.name, row.model, period).set(quota)
            remaining.labels(row.client.name, row.model, period).set(left[period])


def describe(row: Row) -> dict[str, object]:
    """One client's model, as GET /clients shows it."""
    b = row.budget or ClientBudget()
    left = row.remaining()
    rates = row.per_second()
    return {
        "budget": {"tpm": b.tpm, "rpm": b.rpm, "tokens_per_day": b.tokens_per_day,
                   "tokens_per_month": b.tokens_per_month},
        "used_today": math.floor(row.used("day")),
        "used_this_month": math.floor(row.used("month")),
        "remaining": {period: left.get(period) for period in PERIODS},
        "fair_share": None if rates is None else {
            "demand_tokens_per_second": round(rates[0], 3),
            "used_tokens_per_second": round(rates[1], 3)},
    }


async def clients(request: web.Request) -> web.Response:
    """GET /clients: each configured client's budgets, what it used today and this
    month, what it has left, and its fair-share demand and usage. Admin only (as
    /regions). Names and numbers, never a key nor a key's digest. While the store is
    degraded (`degraded: true`) the levels are this replica's local ones, which hold
    only its part of each budget."""
    rt = request.app[RUNTIME]
    authorize_admin(request, rt)
    config = rt.config  # a reload during the awaits must not mix configs
    found = await rows(rt.store, config)
    models: dict[str, dict[str, object]] = {client.name: {} for client in config.clients}
    for row in found:
        models[row.client.name][row.model] = describe(row)
    out = [{"name": client.name, "class": client.priority_class, "weight": client.weight,
            "models": models[client.name]} for client in config.clients]
    return web.json_response({"clients": out, "store": rt.store.name,
                              "degraded": rt.store.degraded})
