"""No reservation leaks, to the token: with refill switched off, after every fault the
tokens missing from each region's bucket must equal what that region's quota counter
charged (the simulator's `admitted_tokens`). A reservation never settled, settled
twice, or refunded for a call the region did charge would show as a difference.

"The bucket is full again after idle" (tests/faults/test_faults.py) is the weaker
check: refill hides a leak there; here nothing refills.

Faults covered: 500 (charged nothing upstream: refunded), a hang (charged upstream:
kept), a reset before the first byte (kept, retried elsewhere) and after it (kept),
truncated JSON (kept), an answer over `max_upstream_body_bytes` (whole: kept, retried
elsewhere; streamed: kept, cut after the first byte), a client that leaves mid-stream
(kept), and plain successes (settled on real usage), on the memory store and on a real
Redis.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from balancer.capacity.base import CapacityStore
from balancer.capacity.factory import create_store
from balancer.config import StoreConfig
from tests.conftest import Stack, StackFactory, gateway_config
from tests.faults.harness import Row, record
from tests.procs import Procs

TPM = 6_000_000  # a 1,000,000-token bucket: no fault below comes near emptying it
MAX_UPSTREAM_BODY = 65_536
NO_REFILL = 1e-9  # time_scale: a bucket refills a token in ~300 years


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    procs = Procs(tmp_path_factory.mktemp("accounting"))
    try:
        _, port = procs.redis()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        procs.close()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_url: str
                ) -> AsyncIterator[CapacityStore | None]:
    if request.param == "memory":
        yield None  # the stack's default MemoryStore
        return
    yield create_store(StoreConfig(url=redis_url, key_prefix=f"acct-{uuid.uuid4().hex[:8]}"))


def body(i: int, stream: bool) -> dict[str, Any]:
    return {"model": "gpt-4", "max_tokens": 20 + i % 30, "stream": stream,
            "messages": [{"role": "user", "content": "word " * (5 + i % 40)}]}


async def send(s: Stack, n: int, *, leave_after_first_chunk: bool = False) -> list[str]:
    """n requests at once, half streams; returns how each ended."""
    async def one(session: aiohttp.ClientSession, i: int) -> str:
        stream = i % 2 == 0
        async with session.post(f"{s.url}/v1/chat/completions", json=body(i, stream)) as r:
            if not stream or r.status != 200:
                await r.read()
                return str(r.status)
            if leave_after_first_chunk:
                await r.content.readany()
                r.close()  # the client goes away mid-stream
                return "left"
            text = await r.text()
            return "done" if "[DONE]" in text else "error_event" if '"error"' in text else "cut"

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(one(session, i) for i in range(n))))


async def charged_vs_reserved(s: Stack) -> dict[str, tuple[float, float]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{s.url}/regions") as r:
            rows = (await r.json())["models"]["gpt-4"]
    stats = await s.sim_stats()
    return {row["region"]: (row["tokens_capacity"] - row["tokens_remaining"],
                            sum(d["admitted_tokens"] for d in stats[row["region"]].values()))
            for row in rows}


FAULTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("none", {}, {}),
    ("500", {"fail_rate": 1.0}, {}),
    ("hang", {"hang": True}, {}),
    ("reset before the first byte", {"reset_after_chunks": 0}, {}),
    ("reset after two chunks", {"reset_after_chunks": 2}, {}),
    ("truncated JSON", {"malformed": "json"}, {}),
    ("answer over max_upstream_body_bytes", {"pad_bytes": 3 * MAX_UPSTREAM_BODY}, {}),
    ("client leaves mid-stream", {}, {"leave_after_first_chunk": True}),
]
CLEAR = {"fail_rate": 0.0, "hang": False, "reset_after_chunks": None, "malformed": None,
         "pad_bytes": 0}
CUT = ("reset after two chunks", "answer over max_upstream_body_bytes")  # after 1st byte


async def test_every_reservation_settles_exactly(stack: StackFactory,
                                                 store: CapacityStore | None) -> None:
    s = await stack(gateway_config({"a": TPM, "b": TPM}, time_scale=NO_REFILL,
                                   read_timeout_seconds=0.3, circuit_failures=10_000,
                                   max_upstream_body_bytes=MAX_UPSTREAM_BODY),
                    store=store)
    ends: dict[str, dict[str, int]] = {}
    for name, knobs, kw in FAULTS:
        if knobs:
            await s.knobs("a", **knobs)
        outcomes = await send(s, 24, **kw)
        await s.knobs("a", **CLEAR)
        ends[name] = {e: outcomes.count(e) for e in set(outcomes)}
        if kw.get("leave_after_first_chunk"):
            await asyncio.sleep(0.5)  # the gateway notices when it next writes
        for region, (reserved, charged) in (await charged_vs_reserved(s)).items():
            assert reserved == pytest.approx(charged, abs=1.0), (name, region, ends)
    totals = await charged_vs_reserved(s)
    assert all(charged > 0 for _, charged in totals.values())  # every region was used
    kind = "memory" if store is None else "redis"
    failed = sum(n for e in ends.values() for k, n in e.items() if k not in ("200", "done",
                                                                            "left"))
    cut = sum(ends[name].get("error_event", 0) for name in CUT)
    assert failed == cut, ends  # only streams a cut after their first byte
    record(Row("fault", f"Reservation accounting to the token, no refill ({kind} store)",
               "24 concurrent requests per fault, 1 replica", 24 * len(FAULTS), failed,
               f"streams cut after the first byte ({cut}); 0 tokens unaccounted", 0,
               "after each of: " + ", ".join(n for n, _, _ in FAULTS) +
               ": tokens reserved == tokens the region charged, per region",
               {"ends": ends, "totals": {r: list(v) for r, v in totals.items()}}))
    print(json.dumps(ends))
