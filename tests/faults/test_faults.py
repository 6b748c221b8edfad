"""Fault injection over real processes: two gateway replicas sharing a redis-server,
the simulator as the regions, a steady open-loop load, and one fault per test.

Every test asserts how many client requests failed (against the number expected),
that no reservation leaked (every bucket is full again after idle and nothing is in
flight), and that no gateway logged an unhandled exception; and records a row of
RELIABILITY.md (`python -m tests.faults.report`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.faults.harness import (
    GATEWAY,
    REGIONS,
    STORE_TIMEOUT,
    Outcome,
    Rig,
    Row,
    config_text,
    get_json,
    get_text,
    knobs,
    leaked_reservations,
    metric,
    record,
    run_load,
    sim_stats,
    summary,
)

pytestmark = pytest.mark.slow

RATE = 30.0  # requests per second over both replicas: about a fifth of the capacity


def held(seconds: float, rate: float = RATE) -> str:
    return f"{rate:.0f} rps for {seconds:g} s, 2 replicas"


async def wait_for(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Poll `check` until true; returns the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def degraded(rig: Rig) -> list[bool]:
    return [bool((await get_json(f"{u}/readyz"))["degraded"]) for u in rig.urls]


async def finish(rig: Rig, name: str, outcomes: list[Outcome], *, expected_failed: int,
                 expected: str, models: tuple[str, ...] = ("gpt-4",), notes: str = "",
                 load: str = "", **extra: Any) -> dict[str, Any]:
    """The checks every fault ends with, then its row of the table."""
    s = summary(outcomes)
    leaks = await leaked_reservations(rig, models)
    problems = rig.log_problems()
    lost = s["lost"] + len(leaks)
    record(Row("fault", name, load, s["requests"], s["failed"], expected, lost, notes,
               {**s, **extra, "leaks": leaks, "log_problems": problems[:5]}))
    failures = [o for o in outcomes if o.failed][:5]
    assert s["failed"] == expected_failed, (s, failures)
    assert not leaks, leaks
    assert s["lost"] == 0, s
    assert not problems, problems
    return s


def after(outcomes: list[Outcome], t: float) -> list[Outcome]:
    return [o for o in outcomes if o.sent >= t]


# --------------------------------------------------------------------------- Redis


async def test_redis_killed_then_restarted(rig: Rig) -> None:
    """SIGKILL the shared store under load: both replicas degrade to local buckets, then
    resync when it is back. Not one client request may fail because of it."""
    rig.start(config_text())
    started = time.monotonic()
    load = asyncio.create_task(run_load(rig.urls, rate=RATE, seconds=9, seed=1))
    await asyncio.sleep(2)
    await asyncio.to_thread(rig.kill_redis)
    to_degrade = await wait_for(lambda: _all(degraded(rig)), 5, "both replicas degraded")
    await asyncio.sleep(2.5)
    await asyncio.to_thread(rig.restart_redis)
    to_resync = await wait_for(lambda: _none(degraded(rig)), 5, "both replicas resynced")
    outcomes = await load
    # Back in shared mode: both heartbeat into the new Redis, admissions go there.
    await wait_for(lambda: _replicas(rig, 2), 6, "two live replicas after the restart")
    assert b"bal:{gpt-4}" in rig.redis_command("KEYS", "bal:*")
    await finish(rig, "Redis killed (SIGKILL) for 2.5 s, then restarted", outcomes, load=held(9),
                 expected_failed=0, expected="0",
                 notes=f"both replicas degraded within {to_degrade + 0.05:.2f} s of the "
                       f"kill and resynced {to_resync:.2f} s after the restart",
                 load_started=round(time.monotonic() - started, 1))


async def test_redis_slow(rig: Rig) -> None:
    """Redis stalls (DEBUG SLEEP, then CLIENT PAUSE): store calls time out after
    2 x store.timeout_seconds, the replicas degrade, and clients wait that long at most
    more than usual, not as long as the stall."""
    stall = 3.0
    rig.start(config_text())
    load = asyncio.create_task(run_load(rig.urls, rate=RATE, seconds=11, seed=2))
    await asyncio.sleep(2)
    t_sleep = time.monotonic()
    # DEBUG SLEEP blocks the whole server; its own reply comes back after the stall.
    sleeping = asyncio.create_task(asyncio.to_thread(
        rig.redis_command, "DEBUG", "SLEEP", str(stall)))
    await wait_for(lambda: _all(degraded(rig)), 3, "degraded during DEBUG SLEEP")
    assert (await sleeping).startswith(b"+OK")
    await wait_for(lambda: _none(degraded(rig)), 5, "resynced after DEBUG SLEEP")
    await asyncio.sleep(1)
    t_pause = time.monotonic()
    reply = await asyncio.to_thread(rig.redis_command, "CLIENT", "PAUSE",
                                    str(int(stall * 1000)), "ALL")
    assert reply.startswith(b"+OK"), reply
    await wait_for(lambda: _all(degraded(rig)), 3, "degraded during CLIENT PAUSE")
    await wait_for(lambda: _none(degraded(rig)), 6, "resynced after CLIENT PAUSE")
    outcomes = await load

    started = t_sleep - 2  # the load began ~2 s before the first stall
    before = [o.latency for o in outcomes if o.sent < 2]
    baseline = max(before)
    during = [o for o in outcomes
              if any(t - started - 0.5 <= o.sent <= t - started + stall
                     for t in (t_sleep, t_pause))]
    worst = max(o.latency for o in during)
    # Added latency is bounded by one store deadline per call that was already waiting
    # (acquire, then settle): 2 x 2 x timeout, plus scheduling noise on 2 cores.
    bound = baseline + 4 * STORE_TIMEOUT + 0.5
    await finish(rig, f"Redis slow: DEBUG SLEEP {stall:g} s, then CLIENT PAUSE {stall:g} s",
                 outcomes, load=held(11), expected_failed=0, expected="0",
                 notes=f"worst latency during the stalls {worst * 1000:.0f} ms "
                       f"(before: {baseline * 1000:.0f} ms; bound {bound * 1000:.0f} ms)",
                 worst_ms=round(worst * 1000), baseline_ms=round(baseline * 1000))
    assert len(during) > 50
    assert worst < bound < stall, (worst, bound)


async def _all(flags: Awaitable[list[bool]]) -> bool:
    return all(await flags)


async def _none(flags: Awaitable[list[bool]]) -> bool:
    return not any(await flags)


async def _replicas(rig: Rig, n: int) -> bool:
    return all([(await get_json(f"{u}/regions"))["replicas"] == n for u in rig.urls])


# --------------------------------------------------------------------------- regions


async def test_region_500s_open_its_circuit(rig: Rig) -> None:
    """Region a answers 500 to everything. Each 500 is retried elsewhere before any byte
    reached the client, a's circuit opens after `circuit_failures`, and from then on a
    gets no traffic at all."""
    rig.start(config_text())
    load = asyncio.create_task(run_load(rig.urls, rate=RATE, seconds=7, seed=3))
    await asyncio.sleep(1.5)
    await knobs(rig, "a", fail_rate=1.0, fail_status=500)
    t_fault = time.monotonic()

    async def circuit_open() -> bool:
        rows = (await get_json(f"{rig.urls[0]}/regions"))["models"]["gpt-4"]
        return any(r["region"] == "a" and r["circuit"] == "open" for r in rows)

    await wait_for(circuit_open, 4, "a's circuit open")
    t_open = time.monotonic()
    failed_at_open = (await sim_stats(rig))["a"]["requests"]
    outcomes = await load
    stats = await sim_stats(rig)
    started = t_fault - 1.5
    served_by_a_after = [o for o in after(outcomes, t_open - started + 0.2) if o.region == "a"]
    await finish(rig, "Region answers 500 to everything", outcomes, load=held(7), expected_failed=0,
                 expected="0: retried before the first byte",
                 notes=f"circuit open {t_open - t_fault:.2f} s after the fault, after "
                       f"{stats['a']['failed']} upstream 500s; no call to it after",
                 upstream_500s=stats["a"]["failed"])
    assert stats["a"]["requests"] == failed_at_open, "traffic reached a after its circuit opened"
    assert not served_by_a_after
    # At most the threshold, plus what was already in flight when it opened.
    assert GATEWAY["circuit_failures"] <= stats["a"]["failed"] <= GATEWAY["circuit_failures"] + 6


async def test_region_hangs(rig: Rig) -> None:
    """Region a accepts connections and never answers: after read_timeout_seconds the
    attempt is abandoned and retried elsewhere, well within deadline_seconds."""
    rig.start(config_text())
    load = asyncio.create_task(run_load(rig.urls, rate=RATE, seconds=6, seed=4))
    await asyncio.sleep(1.5)
    await knobs(rig, "a", hang=True)
    outcomes = await load
    stats = await sim_stats(rig)
    text = await get_text(f"{rig.urls[0]}/metrics") + await get_text(f"{rig.urls[1]}/metrics")
    timeouts = metric(text, "balancer_upstream_errors_total", region="a", reason="timeout")
    worst = max(o.latency for o in outcomes)
    read_timeout = GATEWAY["read_timeout_seconds"]
    await finish(rig, "Region accepts connections, never answers", outcomes, load=held(6),
                 expected_failed=0, expected="0: timed out, retried elsewhere",
                 notes=f"{timeouts:.0f} attempts timed out after {read_timeout} s; worst "
                       f"client latency {worst * 1000:.0f} ms (deadline "
                       f"{GATEWAY['deadline_seconds']} s)",
                 worst_ms=round(worst * 1000), hung_calls=stats["a"]["failed"])
    assert timeouts >= GATEWAY["circuit_failures"]
    assert worst < read_timeout + 1.0  # one timeout, then a healthy region
    assert all(o.region != "a" for o in outcomes if o.latency > read_timeout)


async def test_region_resets_streams(rig: Rig) -> None:
    """Region a drops the connection in the middle of every stream. Phase 1: right after
    the headers (before the first chunk): retried elsewhere, nobody notices. Phase 2:
    after two chunks: the client has bytes already, so no retry; it gets the chunks so
    far, an error event and a clean end. Exactly the streams a served fail."""
    rig.start(config_text(circuit_failures=1000))  # keep a in play for the whole test
    await knobs(rig, "a", reset_after_chunks=0)
    phase1 = await run_load(rig.urls, rate=RATE, seconds=3, seed=5, stream_fraction=0.6)
    cut_early = (await sim_stats(rig))["a"]["failed"]
    await knobs(rig, "a", reset_after_chunks=2)
    phase2 = await run_load(rig.urls, rate=RATE, seconds=4, seed=6, stream_fraction=0.6)
    stats = await sim_stats(rig)
    outcomes = phase1 + phase2
    text = await get_text(f"{rig.urls[0]}/metrics") + await get_text(f"{rig.urls[1]}/metrics")
    retries = metric(text, "balancer_retries_total")
    streams_from_a = [o for o in phase2 if o.stream and o.region == "a"]
    s = await finish(rig, "Region resets the connection mid-stream", outcomes,
                     load=held(7) + ", 60% streams",
                     expected_failed=len(streams_from_a),
                     expected=f"{len(streams_from_a)}: the streams it cut after their first "
                              "byte, each ended by an error event",
                     notes=f"before the first byte: {sum(o.stream for o in phase1)} streams, "
                           f"0 failed (retried); after: {len(streams_from_a)} cut, all with "
                           "an error event, none retried")
    assert all(o.end == "ok" for o in phase1), [o for o in phase1 if o.failed][:3]
    assert streams_from_a and all(o.end == "error_event" for o in streams_from_a)
    assert all(o.end == "ok" for o in phase2 if not (o.stream and o.region == "a"))
    # Retries happen before the first byte only: one per stream cut early, none after.
    calls = sum(r["requests"] for r in stats.values())
    assert cut_early > 0 and retries == cut_early, (cut_early, retries)
    assert calls == s["requests"] + retries, (calls, s["requests"], retries)


async def test_region_429_without_headers(rig: Rig) -> None:
    """Region a is drained by a hidden co-tenant and answers 429: first with no
    retry-after / x-ratelimit headers at all (the gateway cools it down for
    default_cooldown_seconds), then with -1 in x-ratelimit-* (ignored, not trusted)."""
    rig.start(config_text(models=("gpt-4", "gpt-4b")))
    for region in ("a", "b"):  # successes from b carry -1 too
        await knobs(rig, region, throttle_headers="none" if region == "a" else "minus1")
    await knobs(rig, "a", cotenant_tpm=REGIONS["a"] * 10)
    phase1 = await run_load(rig.urls, rate=RATE, seconds=4, seed=7)
    t1 = (await sim_stats(rig))["a"]["throttled"]
    await knobs(rig, "a", throttle_headers="minus1")
    phase2 = await run_load(rig.urls, rate=RATE, seconds=3, seed=8, model="gpt-4b")
    t2 = (await sim_stats(rig))["a"]["throttled"] - t1
    await knobs(rig, "a", cotenant_tpm=0)
    cooldown = GATEWAY["default_cooldown_seconds"]
    await finish(rig, "Region answers 429 without headers, then with -1 in x-ratelimit-*",
                 phase1 + phase2, load=held(7), expected_failed=0,
                 expected="0: cooled down, retried elsewhere",
                 models=("gpt-4", "gpt-4b"),
                 notes=f"{t1} upstream 429s in 4 s without headers (cooldown {cooldown} s), "
                       f"{t2} in 3 s with -1 headers: no hot loop",
                 throttled_no_headers=t1, throttled_minus1=t2)
    # No hot loop: a shared cooldown per 429, so about one 429 per cooldown period, plus
    # what was in flight when it began.
    assert 1 <= t1 <= (4 / cooldown + 1) * 3
    assert 1 <= t2 <= (3 / cooldown + 1) * 3


async def test_region_malformed_answers(rig: Rig) -> None:
    """Region a answers 200 with truncated JSON, then 502 with an HTML page. Neither may
    reach a client: both are retried elsewhere. (The circuit re-opens each second, so a
    keeps being tried.)"""
    rig.start(config_text(models=("gpt-4", "gpt-4b"), circuit_open_seconds=0.5))
    await knobs(rig, "a", malformed="json")
    phase1 = await run_load(rig.urls, rate=RATE, seconds=3, seed=9)
    json_failures = (await sim_stats(rig))["a"]["failed"]
    await knobs(rig, "a", malformed="html")
    phase2 = await run_load(rig.urls, rate=RATE, seconds=3, seed=10, model="gpt-4b")
    html_failures = (await sim_stats(rig))["a"]["failed"] - json_failures
    await knobs(rig, "a", malformed=None)
    await finish(rig, "Region answers truncated JSON (200), then HTML (502)",
                 phase1 + phase2, load=held(6), expected_failed=0, expected="0: retried elsewhere",
                 models=("gpt-4", "gpt-4b"),
                 notes=f"{json_failures} truncated-JSON and {html_failures} HTML answers "
                       "absorbed; no client saw either",
                 malformed_json=json_failures, malformed_html=html_failures)
    assert json_failures >= 3 and html_failures >= 3
    assert all(o.region != "a" for o in phase1 + phase2)


# --------------------------------------------------------------------------- exhaustion


async def test_all_regions_exhausted(rig: Rig) -> None:
    """Demand at several times the capacity. The gateway answers 429 itself, with a
    Retry-After that is right (retrying then succeeds, earlier does not), without
    calling the regions and without spinning; then the same with the regions drained
    by a hidden co-tenant, which the gateway only learns from their 429s."""
    small = {"a": 3_000, "b": 3_000}  # 500-token buckets, refilled at 500 tokens/s
    rig.start(config_text(small, models=("gpt-4", "gpt-4b")))
    pids = [g.proc.pid for g in rig.gateways]
    cpu0 = [_cpu_seconds(p) for p in pids]
    outcomes = await run_load(rig.urls, rate=20, seconds=5, seed=11, stream_fraction=0.2)
    cpu_load = sum(_cpu_seconds(p) for p in pids) - sum(cpu0)
    stats = await sim_stats(rig)
    rejected = [o for o in outcomes if o.status == 429]
    assert len(rejected) > len(outcomes) / 2, summary(outcomes)
    for o in rejected:
        assert o.retry_after is not None and int(o.retry_after) >= 1, o
        assert '"rate_limit_exceeded"' in o.body, o
    # The gateway shields the regions: hardly any upstream 429.
    assert sum(r["throttled"] for r in stats.values()) <= 2, stats
    # No hot loop: idle CPU stays near zero while everything is exhausted.
    cpu1 = sum(_cpu_seconds(p) for p in pids)
    await asyncio.sleep(2)
    idle_cpu = (sum(_cpu_seconds(p) for p in pids) - cpu1) / 2
    assert idle_cpu < 0.1, idle_cpu

    # Retry-After is right: a large request waits for its tokens; retrying when told
    # succeeds, retrying at a third of it does not.
    probe = {"model": "gpt-4", "max_tokens": 900,
             "messages": [{"role": "user", "content": "x " * 40}]}
    url = f"{rig.urls[0]}/v1/chat/completions"
    status, headers = await _post(url, probe)
    while status == 200:  # drain until refused
        status, headers = await _post(url, probe)
    assert status == 429
    wait = int(headers["retry-after-ms"]) / 1000
    assert 1 <= int(headers["Retry-After"]) == max(1, -(-int(headers["retry-after-ms"]) // 1000))
    await asyncio.sleep(wait / 3)
    early, _ = await _post(url, probe)
    await asyncio.sleep(max(0.0, wait - wait / 3) + 0.05)
    on_time, _ = await _post(url, probe)
    assert (early, on_time) == (429, 200), (early, on_time, wait)

    # Hidden co-tenant drains both regions: only their 429s tell.
    for region in small:
        await knobs(rig, region, cotenant_tpm=small[region] * 10)
    hidden = await run_load(rig.urls, rate=20, seconds=4, seed=12, model="gpt-4b")
    stats2 = await sim_stats(rig)
    upstream_429 = sum(r["throttled"] for r in stats2.values()) - sum(
        r["throttled"] for r in stats.values())
    for region in small:
        await knobs(rig, region, cotenant_tpm=0)
    for o in hidden:
        assert o.status in (200, 429), o
        if o.status == 429:
            assert o.retry_after is not None and int(o.retry_after) >= 1, o
    all_outcomes = outcomes + hidden
    not_429 = [o for o in all_outcomes if o.failed and o.status != 429]
    assert not not_429, not_429[:3]
    n429 = sum(o.status == 429 for o in all_outcomes)
    await finish(rig, "All regions exhausted (demand 3x capacity; then a hidden co-tenant)",
                 all_outcomes, expected_failed=n429,
                 expected=f"{n429}: 429 with a correct Retry-After, nothing else",
                 models=("gpt-4", "gpt-4b"), load=held(9, 20) + ", 2 small regions",
                 notes=f"{n429} answered 429 (gateway-side: {len(rejected)} of "
                       f"{len(outcomes)}, {sum(r['throttled'] for r in stats.values())} "
                       f"upstream 429s); hidden co-tenant: {upstream_429} upstream 429s in "
                       f"4 s; gateway CPU {cpu_load / len(outcomes) * 1000:.1f} ms/request, "
                       f"{idle_cpu * 100:.1f}% while idle and exhausted",
                 upstream_429_hidden=upstream_429)
    # Each region cools down on each 429 (shared by both replicas): no hot loop on them.
    assert upstream_429 <= len(small) * (4 / GATEWAY["default_cooldown_seconds"] + 2) * 3


async def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str]]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        await r.read()
        return r.status, dict(r.headers)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
