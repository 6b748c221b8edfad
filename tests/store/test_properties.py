"""Properties over random operation sequences, on every backend.

Refill is made negligible (or zero) so the outcome depends only on the operations
and the random numbers, not on how long each call took on each backend's clock.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer import policy
from balancer.capacity.base import CapacityStore, Grant, Wait
from balancer.capacity.memory import MemoryStore
from balancer.capacity.redis import RedisStore, limits_text, lua_prelude
from balancer.policy import Limits, Refusal

from .conftest import BACKENDS, SLOW, Backends

M = "gpt-4"

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Round r values and equal capacities make exact ties, where tie-breaking shows.
unit = st.one_of(
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    st.sampled_from([0.0, 0.25, 1 / 3, 0.5, 2 / 3, 0.75]),
)


@dataclass(frozen=True)
class Acquire:
    cost: int
    r: float
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settle:
    which: int  # index into the grants issued so far (modulo their number)
    actual: int


@dataclass(frozen=True)
class Cooldown:
    region: int
    seconds: float
    share: float | None = None  # the refill share a 429 implied (learned capacity)
    refusal: Refusal | None = None  # the bounds it put on the region's level


@dataclass(frozen=True)
class Failure:
    region: int


@dataclass(frozen=True)
class Success:
    region: int


Op = Acquire | Settle | Cooldown | Failure | Success

NAMES = ("a", "b", "c", "d")


def limits_strategy(rate: float) -> st.SearchStrategy[list[Limits]]:
    one = st.builds(
        lambda cap, rcap, weight, priority, floor: (cap, rcap, weight, priority, floor),
        st.one_of(st.integers(100, 5000), st.sampled_from([1000, 1000, 2000])),
        st.integers(1, 20),
        st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.7]),
        st.sampled_from([0, 0, 0, 1]),
        st.sampled_from([1.0, 0.2]),  # learned capacity off / on
    )
    return st.lists(one, min_size=1, max_size=len(NAMES)).map(
        lambda specs: [
            Limits(NAMES[i], float(cap), rate, float(rcap), rate, weight, priority, floor)
            for i, (cap, rcap, weight, priority, floor) in enumerate(specs)
        ]
    )


acquires = st.builds(
    Acquire,
    st.one_of(st.integers(0, 6000), st.sampled_from([0, 100, 500])),
    unit,
    st.sampled_from([(), (), (), ("a",), ("b", "c")]),
)
settles = st.builds(Settle, st.integers(0, 100), st.integers(-100, 6000))
refusals = st.one_of(st.none(), st.builds(Refusal, st.sampled_from([0.0, 500.0, 1000.0]),
                                          st.sampled_from([0.0, 0.5]), st.just(0.0),
                                          st.sampled_from([0.0, 1.0])))
capacity_ops = st.lists(st.one_of(acquires, acquires, settles), min_size=1, max_size=30)
all_ops = st.lists(
    st.one_of(
        acquires,
        acquires,
        acquires,
        settles,
        st.builds(Cooldown, st.integers(0, 3), st.sampled_from([0.0, 100.0, 1000.0]),
                  st.sampled_from([None, None, 0.0, 0.35, 0.8, 0.99, 2.0]), refusals),
        st.builds(Failure, st.integers(0, 3)),
        st.builds(Success, st.integers(0, 3)),
    ),
    min_size=1,
    max_size=30,
)


async def run(store: CapacityStore, limits: list[Limits], ops: list[Op]) -> list[object]:
    """Apply `ops`, returning a comparable trace of every result and a final snapshot."""
    trace: list[object] = []
    grants: list[Grant] = []
    for op in ops:
        if isinstance(op, Acquire):
            result = await store.acquire(M, limits, op.cost, op.r, op.exclude)
            if isinstance(result, Grant):
                grants.append(result)
                trace.append(("grant", result.region, result.tokens, result.failures))
            else:
                trace.append(("wait", _rounded(result.retry_after)))
        elif isinstance(op, Settle):
            if grants:
                await store.settle(grants[op.which % len(grants)], op.actual)
        elif isinstance(op, Cooldown):
            await store.cooldown(M, limits[op.region % len(limits)], op.seconds,
                                 share=op.share, refusal=op.refusal)
        elif isinstance(op, Failure):
            trace.append(await store.record_failure(M, limits[op.region % len(limits)], 2, 500))
        else:
            await store.record_success(M, limits[op.region % len(limits)])
    for s in await store.snapshot(M, limits):
        trace.append(
            (s.region, s.tokens, s.requests, _rounded(s.cooldown_seconds), s.circuit, s.failures,
             round(s.factor, 9), s.tokens_capacity)
        )
    return trace


def _rounded(seconds: float) -> float:
    # Cooldowns are measured on each backend's own clock: compare them to the second.
    return seconds if math.isinf(seconds) else round(seconds)


@given(limits=limits_strategy(0.0), ops=all_ops)
@PROPERTY
async def test_same_operations_same_results_on_every_backend(
    make_redis_store: Backends, limits: list[Limits], ops: list[Op]
) -> None:
    """The Lua port makes exactly the choices of policy.py: with no refill (rate 0), the
    whole trace, snapshot levels included, is identical to the memory store's."""
    expected = await run(MemoryStore(), limits, ops)
    got = await run(make_redis_store(fresh=True), limits, ops)
    assert got == expected


# lib.lua's learned-capacity arithmetic, called on the values the test passes: the same
# doubles in, the same doubles out (as "%.17g"), or the same refusal to answer.
LEARNING_HARNESS = """
local lim = parse_limits(ARGV[1])[1]
local x = {}
for i = 2, #ARGV do x[i - 1] = tonumber(ARGV[i]) end
local span, sent, low, low_wait, factor, peak, floor, steady, top = unpack(x, 1, 9)
local ref = { high = x[10], high_wait = x[11], low = x[12], low_wait = x[13],
  reserved_at = x[15] }
local start = { low = low, low_wait = low_wait }
local share = window_share(lim, span, sent, start, ref)
local out = { '', '', '', fmt(bounded(lim, top, x[14])), fmt(savings(lim, span, floor,
  steady, x[14])), fmt(calm_seconds(lim)), fmt(THROTTLE_TOLERANCE), fmt(THROTTLE_MAX_CUT),
  fmt(THROTTLE_BACKOFF), fmt(DRIFT_DECREASE), fmt(WINDOW_SPAN), fmt(SATURATED), fmt(RESERVE),
  fmt(window_end(span, ref)), window_turn(lim, span, steady, peak) and '1' or '0' }
if share then
  out[1] = fmt(share)
  out[2] = window_usable(lim, factor, span, peak, floor, steady, share) and '1' or '0'
  local target = cut_target(factor, share)
  if target then out[3] = fmt(target) end
end
return out
"""
CONSTANTS = ("THROTTLE_TOLERANCE", "THROTTLE_MAX_CUT", "THROTTLE_BACKOFF", "DRIFT_DECREASE",
             "WINDOW_SPAN", "SATURATED", "RESERVE")

finite = st.floats(-1e6, 1e6, allow_nan=False)
positive = st.floats(0, 1e4, allow_nan=False)
shares = st.floats(0, 2, allow_nan=False)


@given(lim=st.builds(Limits, st.just("a"), st.floats(1, 1e6), st.floats(0, 1e5),
                     st.just(10.0), st.just(1.0), st.just(1.0), st.just(0),
                     st.floats(0.05, 1.0), st.floats(0, 0.01)),
       span=positive, sent=finite, low=finite, low_wait=positive, factor=shares,
       peak=finite, floor=shares, steady=positive, top=shares, target=shares,
       end=st.builds(Refusal, finite, positive, finite, positive,
                     st.sampled_from([0.0, 5.0])))
@PROPERTY
async def test_learning_arithmetic_is_the_same_in_lua(
        make_redis_store: Backends, lim: Limits, span: float, sent: float, low: float,
        low_wait: float, factor: float, peak: float, floor: float, steady: float,
        top: float, target: float, end: Refusal) -> None:
    """window_share, window_end, window_usable, savings, cut_target, bounded and the constants of
    lib.lua give exactly what policy.py gives (the store traces above cannot show it:
    windows need refill, and refill differs by each backend's clock)."""
    store = make_redis_store()
    assert isinstance(store, RedisStore)
    lib = lua_prelude()
    args = [limits_text(lim), *(repr(float(v)) for v in (
        span, sent, low, low_wait, factor, peak, floor, steady, top, end.high,
        end.high_wait, end.low, end.low_wait, target, end.reserved_at))]
    got = [v.decode() if isinstance(v, bytes) else v
           for v in await store.client.eval(lib + LEARNING_HARNESS, 0, *args)]
    share = policy.window_share(lim, span, sent, Refusal(0, 0, low, low_wait), end)
    cut = None if share is None else policy.cut_target(factor, share)
    expected = [
        "" if share is None else f"{share:.17g}",
        "" if share is None else
        ("1" if policy.window_usable(lim, factor, span, peak, floor, steady, share) else "0"),
        "" if cut is None else f"{cut:.17g}",
        f"{policy.bounded(lim, top, target):.17g}",
        f"{policy.savings(lim, span, floor, steady, target):.17g}",
        f"{policy.calm_seconds(lim):.17g}",
        *(f"{getattr(policy, name):.17g}" for name in CONSTANTS),
        f"{policy.window_end(span, end):.17g}",
        "1" if policy.window_turn(lim, span, steady, peak) else "0",
    ]
    assert got == expected


@pytest.mark.parametrize("backend", BACKENDS)
@given(limits=limits_strategy(SLOW), ops=capacity_ops)
@PROPERTY
async def test_no_admission_beyond_capacity(
    redis_backends: dict[str, Backends], backend: str, limits: list[Limits], ops: list[Op]
) -> None:
    """A grant needs the bucket to hold its cost (a full bucket for an oversized one),
    after everything charged so far, and one request slot per grant."""
    store = _store(redis_backends, backend)
    by_region = {lim.region: lim for lim in limits}
    charged = dict.fromkeys(by_region, 0.0)  # reserved + charged - refunded, per region
    granted = dict.fromkeys(by_region, 0)
    grants: list[Grant] = []
    for op in ops:
        if isinstance(op, Acquire):
            result = await store.acquire(M, limits, op.cost, op.r, op.exclude)
            if isinstance(result, Wait):
                continue
            lim = by_region[result.region]
            assert result.region not in op.exclude
            # Clamped refunds only lower the level, so capacity - charged bounds it.
            assert charged[lim.region] + min(op.cost, lim.tokens_capacity) <= (
                lim.tokens_capacity + 1e-3
            )
            charged[lim.region] += op.cost
            granted[lim.region] += 1
            assert granted[lim.region] <= lim.requests_capacity
            grants.append(result)
        elif isinstance(op, Settle) and grants:
            grant = grants[op.which % len(grants)]
            await store.settle(grant, op.actual)
            charged[grant.region] += op.actual - grant.tokens
    await _check_within_capacity(store, limits)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    limits=limits_strategy(SLOW),
    costs=st.lists(st.integers(0, 3000), min_size=1, max_size=10),
    refunds=st.lists(st.integers(-5000, 3000), min_size=1, max_size=20),
)
@PROPERTY
async def test_refunds_never_exceed_capacity(
    redis_backends: dict[str, Backends],
    backend: str,
    limits: list[Limits],
    costs: list[int],
    refunds: list[int],
) -> None:
    store = _store(redis_backends, backend)
    grants = []
    for i, cost in enumerate(costs):
        result = await store.acquire(M, limits, cost, (i * 0.37) % 1)
        if isinstance(result, Grant):
            grants.append(result)
    for i, actual in enumerate(refunds):  # over-refunds and repeated settles included
        if grants:
            await store.settle(grants[i % len(grants)], actual)
            await _check_within_capacity(store, limits)


async def _check_within_capacity(store: CapacityStore, limits: list[Limits]) -> None:
    for state in await store.snapshot(M, limits):
        assert state.tokens <= state.tokens_capacity
        assert state.requests <= state.requests_capacity


def _store(redis_backends: dict[str, Backends], backend: str) -> CapacityStore:
    if backend == "memory":
        return MemoryStore()
    return redis_backends[backend](fresh=True)


@pytest.fixture
async def redis_backends(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Backends]]:
    """One client per Redis backend for a whole hypothesis run; fresh keys per example."""
    made: dict[str, Backends] = {}

    class Lazy(dict[str, Backends]):
        def __missing__(self, name: str) -> Backends:
            made[name] = self[name] = Backends(name, request)
            return made[name]

    yield Lazy()
    for b in made.values():
        await b.aclose()
