"""Learned capacity from the tokens sent between two 429s, on every backend
(policy.window_share): the store's side of it, the windows and their counts."""

from __future__ import annotations

import asyncio
import time

import pytest

from balancer import policy
from balancer.capacity.base import Grant

from .conftest import Backends
from .test_conformance import M, learning


async def test_tokens_sent_between_two_429s_bound_the_real_rate(
        make_store: Backends) -> None:
    """No remaining tokens, no usable wait (a whole-second retry-after): the tokens the
    region admitted between two 429s, over the time between, bound its rate."""
    store = make_store()
    a = learning("a", rate=1000.0)  # 1,000 tokens, refilled in 1 s
    unknown = policy.Refusal(500.0, 0.0, 0.0, 0.0)  # below the cost, never negative
    early = await store.acquire(M, [a], 100, 0.5)  # made before the window: never in it
    await store.cooldown(M, a, 0.0, refusal=unknown)
    started = time.monotonic()
    grants = []
    for _ in range(3):
        await asyncio.sleep(0.15)  # the emptied bucket refills 150 tokens
        grants.append(await store.acquire(M, [a], 100, 0.5))
    assert all(isinstance(g, Grant) for g in [early, *grants])
    await store.settle(grants[0], 0)  # refused too: it does not count as sent
    await store.settle(early, 0)  # nor does a refund of what came before the window
    [state] = await store.snapshot(M, [a])
    assert state.factor == 1.0  # one 429 says nothing yet
    await store.cooldown(M, a, 0.0, refusal=policy.Refusal(100.0, 0.0, 0.0, 0.0))
    span = time.monotonic() - started
    [state] = await store.snapshot(M, [a])
    # at most (200 sent + 100 the level held) / span: about 0.6 of the configured rate
    bound = 300 / (span * 1000.0)
    assert 0.3 < bound < 0.8
    assert state.factor == pytest.approx(bound * policy.THROTTLE_BACKOFF, rel=0.15)


async def test_a_window_counts_from_its_refused_request_to_the_next(
        make_store: Backends) -> None:
    """The first 429 reaches the store after another request was reserved: that one
    reached the region after the refused one, so it counts as sent. The last 429 is
    late too: its window ends when its request was reserved, not when the 429 arrived."""
    store = make_store()
    a = learning("a", rate=1000.0)
    refused = await store.acquire(M, [a], 500, 0.5)
    after = await store.acquire(M, [a], 200, 0.5)  # reserved before the 429 came back
    assert isinstance(refused, Grant) and isinstance(after, Grant)
    await store.settle(refused, 0)
    await store.cooldown(M, a, 0.0, refusal=policy.Refusal(
        500.0, 0.0, 0.0, 0.0, reserved_at=refused.at, granted=refused.granted))
    started = time.monotonic()
    await asyncio.sleep(0.4)
    last = await store.acquire(M, [a], 100, 0.5)
    assert isinstance(last, Grant)
    await asyncio.sleep(0.3)  # a slow way back
    await store.settle(last, 0)
    await store.cooldown(M, a, 0.0, refusal=policy.Refusal(
        100.0, 0.0, 0.0, 0.0, reserved_at=last.at, granted=last.granted))
    [state] = await store.snapshot(M, [a])
    # (200 sent + 100) over ~0.4 s, not 0.7 s: a share of about 0.75
    bound = 300 / ((time.monotonic() - started - 0.3) * 1000.0)
    assert 0.5 < bound < 0.8
    assert state.factor == pytest.approx(bound * policy.THROTTLE_BACKOFF, rel=0.15)
