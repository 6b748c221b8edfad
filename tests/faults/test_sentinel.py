"""A Sentinel failover under load: two gateway replicas on `redis+sentinel://` (REDIS_URL,
sentinel and data nodes behind one password), a primary, one replica and three
sentinels (quorum 2, down-after 1 s), the simulator as the regions, a steady open-loop
load. The primary is killed (SIGKILL) mid-run; the sentinels promote the replica.

Passes when no client request fails (degraded mode serves while there is no primary),
nothing leaks, and both gateways are back on the shared store (/readyz `degraded:
false`: a heartbeat went through to the promoted primary) within 10 s of the
promotion (when the sentinels first name the new primary)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from balancer.capacity.redis import _script
from tests.faults.harness import Rig, config_text, get_json, run_load
from tests.faults.test_faults import _replicas, degraded, finish, wait_for
from tests.store.conftest import SentinelSet, need_redis_binary

pytestmark = pytest.mark.slow

RATE, SECONDS, KILL_AT = 20.0, 16.0, 4.0
PASSWORD = "sentinel-fault-pw-Jt62"
BACK_WITHIN = 10.0  # seconds from the promotion until both gateways use the new primary


async def test_sentinel_failover_under_load(rig: Rig, tmp_path: Path) -> None:
    need_redis_binary()
    with SentinelSet(tmp_path / "sentinel", password=PASSWORD) as s:
        assert s.primary is not None and s.replica is not None
        rig.start(config_text(), redis=False, env={"REDIS_URL": s.url})
        assert not any(await degraded(rig))
        for url in rig.urls:
            assert (await get_json(f"{url}/readyz"))["store"] == "redis-sentinel"
        old = s.primary_address()
        sha = hashlib.sha1(_script("acquire").encode()).hexdigest()

        load = asyncio.create_task(run_load(rig.urls, rate=RATE, seconds=SECONDS, seed=41))
        await asyncio.sleep(KILL_AT)
        with s.replica.client() as c:  # EVALSHA replicates effects, not scripts
            replica_had_script = c.script_exists(sha) == [True]
        t_kill = time.monotonic()
        await asyncio.to_thread(s.primary.kill)

        # Every 50 ms: which gateways are degraded, and whom the sentinels name.
        went: dict[int, float] = {}  # gateway -> seconds after the kill it degraded
        back: dict[int, float] = {}  # gateway -> ... it was back on the shared store
        promoted = None
        while len(back) < len(rig.urls) and time.monotonic() - t_kill < 20:
            now = time.monotonic() - t_kill
            if promoted is None and await asyncio.to_thread(s.primary_address, 1) != old:
                promoted = now
            for i, flag in enumerate(await degraded(rig)):
                if flag:
                    went.setdefault(i, now)
                elif i in went and promoted is not None:
                    back.setdefault(i, now)
            await asyncio.sleep(0.05)
        outcomes = await load
        assert promoted is not None, "the sentinels never promoted the replica"
        assert s.primary_address() == ("127.0.0.1", s.replica.port)
        assert sorted(went) == sorted(back) == list(range(len(rig.urls))), (went, back)
        # Back in shared mode on the new primary: both heartbeat there, buckets live there,
        # and the clients loaded the scripts it lacked (NOSCRIPT, then SCRIPT LOAD).
        await wait_for(lambda: _replicas(rig, 2), 6, "two live replicas on the new primary")
        with s.replica.client() as c:
            assert c.keys("bal:{gpt-4}:*")
            assert c.script_exists(sha) == [True]
        to_back = max(back.values()) - promoted
        await finish(rig, "Redis Sentinel failover: primary killed (SIGKILL) mid-run",
                     outcomes, load=f"{RATE:.0f} rps for {SECONDS:g} s, 2 replicas, 3 sentinels",
                     expected_failed=0, expected="0",
                     notes=f"degraded within {max(went.values()):.2f} s of the kill; the "
                           f"sentinels promoted the replica {promoted:.2f} s after it; both "
                           f"replicas back on the shared store (the promoted primary) "
                           f"{to_back:.2f} s after the promotion (bound {BACK_WITHIN:g} s)"
                           + ("" if replica_had_script else "; it lacked the Lua scripts: "
                              "reloaded on NOSCRIPT"),
                     degraded_s=round(max(went.values()), 2), promoted_s=round(promoted, 2),
                     back_after_promotion_s=round(to_back, 2),
                     replica_had_script=replica_had_script)
        assert to_back <= BACK_WITHIN, (promoted, back)
