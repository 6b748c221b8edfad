"""Client budgets and fair share, on every backend (memory, fakeredis, Redis, Cluster),
and the Lua port of balancer/tenancy.py against the Python original."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer import tenancy
from balancer.capacity.base import Grant, Queueing, Wait
from balancer.capacity.memory import MemoryStore
from balancer.capacity.redis import RedisStore, client_text, lua_prelude
from balancer.capacity.tenants import ClientBook
from balancer.tenancy import ClientLimits, Share

from .conftest import SLOW, Backends, lim

M = "gpt-4"
PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def budgeted(name: str = "team", *, tpm: float = 0, rpm: float = 0, day: float = 0,
             month: float = 0, window: float = 0.0) -> ClientLimits:
    """A client whose buckets hold `tpm` tokens and `rpm` requests and barely refill."""
    return ClientLimits(name, 1.0, float(tpm), SLOW if tpm else 0.0, float(rpm),
                        SLOW if rpm else 0.0, float(day), float(month), window, 0.05)


async def test_tpm_budget_refuses_beyond_its_bucket_and_names_it(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 10_000)
    team = budgeted(tpm=1000)
    first = await store.acquire(M, [a], 600, 0.5, client=team)
    assert isinstance(first, Grant) and first.client == team
    assert first.budget is not None and first.budget.tokens == pytest.approx(400)
    refused = await store.acquire(M, [a], 600, 0.5, client=team)
    assert isinstance(refused, Wait) and refused.reason == "tpm"
    assert refused.retry_after > 1e6  # 200 tokens short at a negligible refill
    # The refusal reserved nothing in the region.
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(9400)
    # Another client is not affected, and a refund gives the budget back.
    assert isinstance(await store.acquire(M, [a], 600, 0.5, client=budgeted("other", tpm=1000)),
                      Grant)
    await store.settle(first, 100)
    again = await store.acquire(M, [a], 600, 0.5, client=team)
    assert isinstance(again, Grant) and again.budget is not None
    assert again.budget.tokens == pytest.approx(300)


async def test_rpm_budget_counts_requests(make_store: Backends) -> None:
    store = make_store()
    team = budgeted(rpm=2)
    results = [await store.acquire(M, [lim("a")], 1, 0.5, client=team) for _ in range(3)]
    assert [type(r).__name__ for r in results] == ["Grant", "Grant", "Wait"]
    assert isinstance(results[2], Wait) and results[2].reason == "rpm"


async def test_day_and_month_quotas_refuse_until_the_period_ends(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 10_000)
    daily = budgeted("daily", day=1000, month=10_000)
    assert isinstance(await store.acquire(M, [a], 800, 0.5, client=daily), Grant)
    day = await store.acquire(M, [a], 300, 0.5, client=daily)
    assert isinstance(day, Wait) and day.reason == "day"
    assert 0 < day.retry_after <= 86_400
    monthly = budgeted("monthly", month=500)
    month = await store.acquire(M, [a], 600, 0.5, client=monthly)
    assert isinstance(month, Wait) and month.reason == "month"
    assert 0 < month.retry_after <= 31 * 86_400
    [d, m] = await store.clients(M, [daily, monthly])
    assert (d.budget.day_used, d.budget.month_used) == (800, 800)
    assert m.budget.day_used == 0


async def test_refusal_by_budget_leaves_the_queue(make_store: Backends) -> None:
    """A request over its own budget does not wait in the pool's queue: its limit is
    its own, and a place there would hold back the others."""
    store = make_store()
    team = budgeted(tpm=100)
    assert isinstance(await store.acquire(M, [lim("a")], 60, 0.5, client=team), Grant)
    queue = Queueing("t1", 0.0, 30.0)
    result = await store.acquire(M, [lim("a")], 60, 0.5, queue=queue, client=team)
    assert isinstance(result, Wait) and result.reason == "tpm" and not result.queued
    # Nobody is ahead of a newcomer.
    other = await store.acquire(M, [lim("a")], 50, 0.5, queue=Queueing("t2", 0, 0))
    assert isinstance(other, Grant)


async def test_settle_charges_the_client_what_the_region_charged(make_store: Backends) -> None:
    store = make_store()
    team = budgeted(tpm=10_000, day=100_000)
    grant = await store.acquire(M, [lim("a", 10_000)], 1000, 0.5, client=team)
    assert isinstance(grant, Grant)
    await store.settle(grant, 1500)
    [state] = await store.clients(M, [team])
    assert state.budget.tokens == pytest.approx(8500)
    assert state.budget.day_used == pytest.approx(1500)
    refunded = await store.acquire(M, [lim("a", 10_000)], 1000, 0.5, client=team)
    assert isinstance(refunded, Grant)
    await store.settle(refunded, 0)  # a 429: the region charged nothing
    [state] = await store.clients(M, [team])
    assert state.budget.day_used == pytest.approx(1500)
    assert state.budget.tokens == pytest.approx(8500)


async def test_fair_share_holds_the_greedy_client_not_the_modest_one(
        make_store: Backends) -> None:
    """Two clients, a pool that refills 100 tokens a second and fair windows of 10 s
    (1000 tokens): once the greedy client has taken more than its share of a pool whose
    demand exceeds it, it is held (reason fair_share), while the modest one is served."""
    store = make_store()
    pool = [lim("a", 100_000, 50.0), lim("b", 100_000, 50.0)]
    greedy = ClientLimits("greedy", 1.0, fair_window=10.0, fair_headroom=0.05)
    modest = ClientLimits("modest", 1.0, fair_window=10.0, fair_headroom=0.05)
    assert isinstance(await store.acquire(M, pool, 100, 0.5, client=modest), Grant)
    results = [await store.acquire(M, pool, 100, 0.5, client=greedy) for _ in range(20)]
    held = [r for r in results if isinstance(r, Wait)]
    assert held and all(r.reason == "fair_share" and r.retry_after > 0 for r in held)
    granted = sum(isinstance(r, Grant) for r in results)
    # Demand fits the pool (1000 tokens a window) for 9 requests: nobody is held. The
    # 10th makes it short; the greedy client's share is then the window less the modest
    # client's 100, less the headroom: 855 tokens, and it has used 900.
    assert granted == 9
    assert isinstance(await store.acquire(M, pool, 100, 0.5, client=modest), Grant)
    states = await store.clients(M, [greedy, modest])
    assert states[0].used == pytest.approx(900, rel=0.01)
    assert states[0].demand == pytest.approx(2000, rel=0.01)
    assert states[1].used == pytest.approx(200, rel=0.01)


async def test_a_lone_client_is_never_held(make_store: Backends) -> None:
    store = make_store()
    pool = [lim("a", 100_000, 10.0)]
    alone = ClientLimits("alone", 1.0, fair_window=10.0, fair_headroom=0.05)
    results = [await store.acquire(M, pool, 1000, 0.5, client=alone) for _ in range(30)]
    assert all(isinstance(r, Grant) for r in results)


async def test_weighted_fair_queuing_serves_the_modest_client_first(
        make_store: Backends) -> None:
    """In the admission queue, a client's requests start at its virtual clock: the greedy
    client's run far ahead, so the modest client's newcomer is not behind them."""
    store = make_store()
    pool = [lim("a", 1000, SLOW)]
    greedy = ClientLimits("greedy", 1.0, fair_window=10.0, fair_headroom=0.05)
    modest = ClientLimits("modest", 1.0, fair_window=10.0, fair_headroom=0.05)
    assert isinstance(await store.acquire(M, pool, 1000, 0.5, client=greedy), Grant)
    for i in range(5):  # the pool is empty: these wait
        wait = await store.acquire(M, pool, 1000, 0.5, queue=Queueing(f"g{i}", 0, 30),
                                   client=greedy)
        assert isinstance(wait, Wait) and wait.queued
    mine = await store.acquire(M, pool, 10, 0.5, queue=Queueing("m", 0, 30), client=modest)
    assert isinstance(mine, Wait) and mine.position == 0


# -- the Lua port -------------------------------------------------------------------------

HARNESS = """
local c = parse_client(ARGV[1])
local x = {}
for i = 2, #ARGV do x[i - 1] = tonumber(ARGV[i]) end
local now, cost, tokens, requests, day_used, month_used = unpack(x, 1, 6)
local b = { tokens = tokens, requests = requests, day_used = day_used, month_used = month_used }
local reason, wait = budget_refusal(c, b, cost)
local qreason, qwait = quota_refusal(c, b, cost, now)
local y, m = civil(day_of(now))
local book = {}
for i = 0, 2 do
  book[#book + 1] = { name = 'c' .. i, weight = x[7 + 3 * i], demand = x[8 + 3 * i],
    used = x[9 + 3 * i] }
end
local pool, me = x[16], 1
local cap = fair_cap(book, me, pool, c.fair_window, c.fair_headroom)
local out = { reason or '', wait and fmt(wait) or '', qreason or '', qwait and fmt(qwait) or '',
  string.format('%d', y), string.format('%d', m), fmt(month_reset(now)), fmt(day_reset(now)),
  cap and fmt(cap) or '', fmt(decay(cost, now / 1e6, c.fair_window)),
  fmt(virtual_advance(virtual_start(now, tokens, c.fair_window), cost, c.weight, pool,
    x[7] + x[10])) }
if cap then out[#out + 1] = fmt(fair_wait(book[me].used, cap, cost, c.fair_window)) end
return out
"""

floats = st.floats(0, 1e6, allow_nan=False)
clients = st.builds(ClientLimits, st.just("c0"), st.floats(0.1, 5), st.sampled_from([0.0, 500.0]),
                    st.floats(0, 100), st.sampled_from([0.0, 3.0]), st.floats(0, 2),
                    st.sampled_from([0.0, 1000.0]), st.sampled_from([0.0, 5000.0]),
                    st.sampled_from([0.0, 10.0, 0.5]), st.sampled_from([0.0, 0.05]))


@dataclass
class Book:
    weights: list[float]
    demands: list[float]
    used: list[float]


books = st.builds(Book, st.lists(st.floats(0.1, 4), min_size=3, max_size=3),
                  st.lists(st.one_of(st.just(0.0), st.floats(0, 5000)), min_size=3,
                           max_size=3),
                  st.lists(st.floats(0, 5000), min_size=3, max_size=3))


@given(c=clients, now=st.floats(0, 4e9), cost=st.floats(0, 3000), levels=st.tuples(
       floats, st.floats(0, 5), st.floats(0, 2000), st.floats(0, 6000)), book=books,
       pool=st.floats(0, 500))
@PROPERTY
async def test_tenancy_arithmetic_is_the_same_in_lua(
        make_redis_store: Backends, c: ClientLimits, now: float, cost: float,
        levels: tuple[float, float, float, float], book: Book, pool: float) -> None:
    store = make_redis_store()
    assert isinstance(store, RedisStore)
    prelude = lua_prelude()
    args = [client_text(c), *(repr(float(v)) for v in (now, cost, *levels)),
            *(repr(float(v)) for i in range(3)
              for v in (book.weights[i], book.demands[i], book.used[i])), repr(float(pool))]
    got = [v.decode() if isinstance(v, bytes) else v
           for v in await store.client.eval(prelude + HARNESS, 0, *args)]
    budget = tenancy.Budget(*levels)
    refusal = tenancy.refusal(c, budget, cost)
    quota = tenancy.quota_refusal(c, budget, cost, now)
    year, month = tenancy.civil(tenancy.day_of(now))
    shares = [Share(f"c{i}", book.weights[i], book.demands[i], book.used[i]) for i in range(3)]
    cap = tenancy.fair_cap(shares, 0, pool, c.fair_window, c.fair_headroom)
    start = tenancy.virtual_start(now, levels[0], c.fair_window)
    expected = [
        refusal[0] if refusal else "", f"{refusal[1]:.17g}" if refusal else "",
        quota[0] if quota else "", f"{quota[1]:.17g}" if quota else "",
        str(year), str(month), f"{tenancy.month_reset(now):.17g}",
        f"{tenancy.day_reset(now):.17g}", "" if cap is None else f"{cap:.17g}",
        f"{tenancy.decay(cost, now / 1e6, c.fair_window):.17g}",
        f"{tenancy.virtual_advance(start, cost, c.weight, pool, book.weights[0] + book.weights[1]):.17g}",  # noqa: E501
    ]
    if cap is not None:
        expected.append(f"{tenancy.fair_wait(book.used[0], cap, cost, c.fair_window):.17g}")
    assert got == expected  # infinity: "inf" in both


# -- pure functions -------------------------------------------------------------------


@given(st.integers(-50_000, 200_000))
def test_calendar_matches_datetime(days: int) -> None:
    date = dt.date(1970, 1, 1) + dt.timedelta(days=days)
    assert tenancy.civil(days) == (date.year, date.month)
    first = date.replace(day=1)
    assert tenancy.days_from_civil(date.year, date.month) == (first - dt.date(1970, 1, 1)).days


def test_period_resets() -> None:
    now = dt.datetime(2026, 12, 31, 23, 0, tzinfo=dt.UTC).timestamp()
    assert tenancy.day_reset(now) == pytest.approx(3600)
    assert tenancy.month_reset(now) == pytest.approx(3600)
    assert tenancy.month_of(now) == 2026 * 12 + 11
    assert tenancy.month_of(now + 3600) == 2027 * 12


@given(st.lists(st.floats(0, 1000), min_size=1, max_size=6),
       st.lists(st.floats(0.1, 5), min_size=6, max_size=6), st.floats(0, 3000))
def test_shares_are_max_min_fair(demands: list[float], weights: list[float],
                                 capacity: float) -> None:
    weights = weights[:len(demands)]
    alloc = tenancy.shares(demands, weights, capacity)
    assert all(a <= d + 1e-9 for a, d in zip(alloc, demands, strict=True))
    if sum(demands) <= capacity:
        assert alloc == pytest.approx(demands)
        return
    assert sum(alloc) == pytest.approx(capacity)
    # Max-min: whoever gets less than it asks gets at least every other client's
    # allocation per unit of weight.
    held = [i for i in range(len(demands)) if alloc[i] < demands[i] - 1e-6]
    for i in held:
        for j in range(len(demands)):
            assert alloc[i] / weights[i] >= alloc[j] / weights[j] - 1e-6


def test_fair_wait_is_when_usage_decays_to_room() -> None:
    wait = tenancy.fair_wait(1000.0, 900.0, 100.0, 10.0)
    assert tenancy.decay(1000.0, wait, 10.0) + 100.0 == pytest.approx(900.0)
    assert tenancy.fair_wait(100.0, 900.0, 100.0, 10.0) == 0.0
    assert tenancy.fair_wait(100.0, 50.0, 100.0, 10.0) == 10.0
    assert math.isfinite(tenancy.fair_wait(0.0, 0.0, 0.0, 10.0))


async def test_memory_store_quotas_follow_the_wall_clock() -> None:
    """The memory store's buckets use a monotonic clock, its quotas the calendar."""
    wall = [dt.datetime(2026, 11, 29, 23, 59, 59, tzinfo=dt.UTC).timestamp()]
    store = MemoryStore(wall=lambda: wall[0])
    daily = budgeted("d", day=1000)
    assert isinstance(await store.acquire(M, [lim("a", 10_000)], 900, 0.5, client=daily), Grant)
    assert isinstance(await store.acquire(M, [lim("a", 10_000)], 900, 0.5, client=daily), Wait)
    wall[0] += 2  # past midnight: a new day
    assert isinstance(await store.acquire(M, [lim("a", 10_000)], 900, 0.5, client=daily), Grant)


def test_carried_usage_counts_for_its_day_and_month_only() -> None:
    """ClientBook.carry (degraded mode's start from the shared counts): the carried
    usage counts for the day and month it was seen in, never lowers a count, and rolls
    over with the calendar."""
    book = ClientBook()
    c = ClientLimits("c", 1.0, tokens_per_day=1000.0, tokens_per_month=5000.0)
    noon = 1_800_000_000 - 1_800_000_000 % 86_400 + 43_200  # 2027-01-15 12:00 UTC
    book.carry(c, 600.0, 2000.0, 0.0, noon)
    assert book.state(c, 1.0, noon + 60).budget.day_used == 600
    book.carry(c, 100.0, 100.0, 2.0, noon + 120)  # an older count lowers nothing
    state = book.state(c, 3.0, noon + 180).budget
    assert (state.day_used, state.month_used) == (600, 2000)
    tomorrow = book.state(c, 4.0, noon + 86_400).budget
    assert (tomorrow.day_used, tomorrow.month_used) == (0, 2000)
