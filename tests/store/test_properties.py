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

from balancer.capacity.base import CapacityStore, Grant, Wait
from balancer.capacity.memory import MemoryStore
from balancer.policy import Limits

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
capacity_ops = st.lists(st.one_of(acquires, acquires, settles), min_size=1, max_size=30)
all_ops = st.lists(
    st.one_of(
        acquires,
        acquires,
        acquires,
        settles,
        st.builds(Cooldown, st.integers(0, 3), st.sampled_from([0.0, 100.0, 1000.0]),
                  st.sampled_from([None, None, 0.0, 0.35, 0.8, 0.99, 2.0])),
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
                                 share=op.share)
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
