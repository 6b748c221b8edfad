"""Scenarios beyond static quotas: does each policy of README's "Beyond static quotas"
help when its situation really happens?

    balancer bench scenarios            # from the repository root (~4.5 min)
    balancer bench scenarios --quick    # the CI smoke: a few seconds per run

The machinery is bench/balance.py's: a simulator process serving the reference regions of
regions.yaml (their real TPM), 3 `balancer serve` replicas sharing one Redis, open-loop
load processes (bench/loadgen.py, the same request mix), compressed time. Each scenario
runs twice on a fresh simulator, the policy under test ON then OFF (capacity-only
balancing); every other policy is set identically in both runs, at the product defaults
(admission queue enabled with no default wait, learned capacity and latency weighting
enabled), and written explicitly into both configs.

  (a) slow:     eastus2 becomes 3x slower at the midpoint (simulator knob slowdown=3);
                latency_weighting (strength 1.0) ON vs OFF.
  (b) cotenant: a hidden co-tenant drains half the quota of canadaeast and australiaeast
                from the start (simulator knob cotenant_tpm); learned_capacity ON vs OFF.
  (c) burst:    steady load at 0.8x capacity, then a 10-second (real) burst at 3x, then
                0.8x again; admission_queue with default_wait_ms 10,000 for chat and
                completions ON vs the queue disabled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancer.config import AdmissionQueue, LatencyWeighting, LearnedCapacity
from bench import report
from bench.harness import (
    Loads,
    Region,
    Sampler,
    add_load_arguments,
    at,
    bench_config,
    client_summary,
    load_mix,
    mean_cost,
    redis_server,
    reference_regions,
    require_redis,
    serve_cmd,
    simulate_cmd,
    start_pool,
    wait_until,
    workspace,
)
from bench.loadgen import Mix, merge
from bench.procs import ROOT, Procs, get_text, post_json

# The product defaults of the three policies (balancer.config, README "Beyond static
# quotas"): what every policy not under test is set to, in both runs of a scenario.
DEFAULTS: dict[str, Any] = {
    "admission_queue": {"enabled": AdmissionQueue.enabled,
                        "default_wait_ms": dict(AdmissionQueue().default_wait_ms)},
    "learned_capacity": {"enabled": LearnedCapacity.enabled},
    "latency_weighting": {"enabled": LatencyWeighting.enabled,
                          "strength": LatencyWeighting.strength},
}


@dataclass
class Phase:
    """One load process group: `demand` x total TPM from `start` for `duration` real s."""

    name: str
    start: float
    duration: float
    demand: float


@dataclass
class Event:
    """POST /_sim/regions/{region} with `knobs` at `at` real seconds (0: before the load)."""

    at: float
    region: str
    knobs: dict[str, Any]


@dataclass
class Scenario:
    key: str
    title: str
    feature: str  # the regions.yaml section under test
    on: dict[str, Any]
    off: dict[str, Any]
    time_scale: float
    duration: float  # real seconds of load
    phases: list[Phase]
    events: list[Event] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def sections(self, variant: str) -> dict[str, Any]:
        out = json.loads(json.dumps(DEFAULTS))
        out[self.feature] = self.on if variant == "on" else self.off
        return out


def scenarios(quick: bool) -> dict[str, Scenario]:
    """The three scenarios; `quick` shrinks every duration for the CI smoke."""
    k = 0.05 if quick else 1.0  # duration factor
    ts_ab = 30.0 if quick else 10.0
    a_len, b_len = 30 * k, 30 * k
    c_steady, c_burst, c_tail = 15 * k, 10 * k, 15 * k
    c_len = c_steady + c_burst + c_tail
    wait_ms = 10_000
    return {
        "slow": Scenario(
            "slow", "(a) eastus2 3x slower from the midpoint", "latency_weighting",
            on={"enabled": True, "strength": 1.0}, off={"enabled": False, "strength": 1.0},
            time_scale=ts_ab, duration=a_len,
            phases=[Phase("first half", 0, a_len / 2, 0.8),
                    Phase("second half", a_len / 2, a_len / 2, 0.8)],
            events=[Event(a_len / 2, "eastus2", {"slowdown": 3.0})]),
        "cotenant": Scenario(
            "cotenant", "(b) hidden co-tenant takes half of canadaeast and australiaeast",
            "learned_capacity", on={"enabled": True}, off={"enabled": False},
            time_scale=ts_ab, duration=b_len,
            phases=[Phase("steady", 0, b_len, 1.0)],
            events=[Event(0, "canadaeast", {"cotenant_tpm": 50_000}),
                    Event(0, "australiaeast", {"cotenant_tpm": 20_000})]),
        "burst": Scenario(
            "burst", f"(c) {c_burst:g} s burst at 3x after a steady 0.8x", "admission_queue",
            on={"enabled": True, "default_wait_ms": {
                "chat/completions": wait_ms, "completions": wait_ms, "embeddings": 0}},
            off={"enabled": False, "default_wait_ms": {
                "chat/completions": 0, "completions": 0, "embeddings": 0}},
            # Real time: the burst and the wait are real seconds, as a client lives them.
            time_scale=1.0, duration=c_len,
            phases=[Phase("steady", 0, c_len, 0.8),
                    Phase("burst", c_steady, c_burst, 2.2)]),
    }


# --------------------------------------------------------------------------- one run


def scrape_wait_histogram(urls: list[str]) -> dict[float, float]:
    """balancer_admission_wait_seconds summed over replicas and outcomes: le -> count."""
    buckets: dict[float, float] = {}
    for url in urls:
        for line in get_text(url + "/metrics").splitlines():
            if line.startswith("balancer_admission_wait_seconds_bucket{"):
                labels, value = line.rsplit(" ", 1)
                le = labels.split('le="', 1)[1].split('"', 1)[0]
                bound = float("inf") if le == "+Inf" else float(le)
                buckets[bound] = buckets.get(bound, 0.0) + float(value)
    return buckets


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (None: no observation)."""
    if not buckets:
        return None
    total = buckets.get(float("inf"), max(buckets.values()))
    if total <= 0:
        return None
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return bound
    return float("inf")


def run_variant(sc: Scenario, variant: str, regions: list[Region], keep: dict[str, Any],
                args: argparse.Namespace, mix: Mix, mc: float, workdir: Path, db: int,
                redis_port: int, progress: report.Progress) -> dict[str, Any]:
    wd = workdir / f"{sc.key}-{variant}"
    wd.mkdir(parents=True, exist_ok=True)
    sections = sc.sections(variant)
    config = wd / "regions.yaml"
    config.write_text(bench_config(regions, args.model, {"time_scale": sc.time_scale, **keep},
                                   sections))
    total_tpm = sum(r.tpm for r in regions)
    with Procs(wd) as procs:
        sim, replicas = start_pool(procs, f"redis://127.0.0.1:{redis_port}/{db}",
                                   args.log_level, simulate_cmd(config, sc.time_scale, args.seed),
                                   serve_cmd(config), args.replicas)
        for ev in sc.events:
            if ev.at <= 0:
                post_json(f"{sim}/_sim/regions/{ev.region}", ev.knobs)
        # every load process is spawned now and starts on schedule (--start-at)
        t0 = time.time() + (1.0 if args.quick else 1.5)
        loads = Loads(procs, mix, args.seed * 1000)
        for ph in sc.phases:
            rate = ph.demand * total_tpm * sc.time_scale / 60 / mc
            count = max(1, min(args.clients, round(rate / 15)))
            for _ in range(count):
                loads.spawn(ph.name, replicas, rate / count, ph.duration, start_at=t0 + ph.start)
        sampler = Sampler(sim, args.model, args.sample_interval)
        started = wait_until(t0)
        sampler.take()
        pending = sorted((ev for ev in sc.events if ev.at > 0), key=lambda e: e.at)

        def fire(elapsed: float) -> None:
            while pending and elapsed >= pending[0].at:
                ev = pending.pop(0)
                post_json(f"{sim}/_sim/regions/{ev.region}", ev.knobs)

        label = f"{sc.key} {variant.upper():3s}"
        with sampler:
            loads.wait(started, sc.duration, progress,
                       lambda elapsed: report.running("scenarios", label, elapsed, sc.duration),
                       slack=150, each=fire)
        sampler.take()
        waits = scrape_wait_histogram(replicas)
        merged = {name: merge(reps) for name, reps in loads.reports().items()}
    return analyse(sc, variant, regions, sampler.samples, merged, started, waits, sections)


# --------------------------------------------------------------------------- analysis


def analyse(sc: Scenario, variant: str, regions: list[Region],
            samples: list[tuple[float, dict[str, dict[str, int]]]],
            phases: dict[str, dict[str, Any]], started: float, waits: dict[float, float],
            sections: dict[str, Any]) -> dict[str, Any]:
    sim_minute = 60.0 / sc.time_scale
    total_tpm = sum(r.tpm for r in regions)

    def window(t0: float, t1: float) -> dict[str, Any]:
        """Upstream counters between t0 and t1 real seconds after the start."""
        a, b = started + t0, started + t1

        def d(key: str, region: str) -> float:
            return at(samples, b, region, key) - at(samples, a, region, key)

        admitted = sum(d("admitted_tokens", r.name) for r in regions)
        calls = sum(d("requests", r.name) for r in regions)
        throttled = sum(d("throttled", r.name) for r in regions)
        minutes = (t1 - t0) / sim_minute
        return {"from_s": t0, "to_s": t1, "delivered_tpm": admitted / minutes,
                "delivered": admitted / minutes / total_tpm, "upstream_calls": calls,
                "upstream_429": throttled, "upstream_429_rate": throttled / max(calls, 1),
                "per_region_tpm": {r.name: d("admitted_tokens", r.name) / minutes
                                   for r in regions}}

    out: dict[str, Any] = {
        "variant": variant, "sections": sections,
        "clients": {name: client_summary(rep) for name, rep in phases.items()},
        "all_clients": client_summary(merge(list(phases.values()))),
        "whole": window(0, sc.duration),
        "admission_wait": {"queued": waits.get(float("inf"), 0.0),
                           "p99_bucket_s": histogram_quantile(waits, 0.99),
                           "buckets": {str(k): v for k, v in sorted(waits.items())}},
    }
    if sc.key == "slow":
        out["second_half"] = window(sc.duration / 2, sc.duration)
    elif sc.key == "cotenant":
        warm = min(sim_minute, sc.duration / 3)
        out["steady"] = window(warm, sc.duration)
    elif sc.key == "burst":
        burst = next(p for p in sc.phases if p.name == "burst")
        out["burst_window"] = window(burst.start, burst.start + burst.duration)
    return out


# --------------------------------------------------------------------------- output


def render(record: dict[str, Any]) -> str:
    res = record["scenarios"]
    out = []
    on_off = {"on": "ON", "off": "OFF"}
    if "slow" in res:
        sc = res["slow"]
        rows = []
        for v in ("on", "off"):
            r = sc[v]
            second = r["clients"]["second half"]
            share = second["regions"].get("eastus2", 0) / max(1, second["ok"])
            rows.append([f"latency_weighting {on_off[v]}", report.ms(r["all_clients"]["p99"]),
                         report.ms(second["p99"]), report.ms(second["p90"]),
                         report.ms(second["mean"]), report.pct(share),
                         f"{r['whole']['delivered_tpm'] / 1000:,.0f}K",
                         f"{r['second_half']['delivered_tpm'] / 1000:,.0f}K",
                         report.pct(r["all_clients"]["rejected_429"], 2)])
        out.append(f"### {sc['title']}\n\n" + report.table(
            ["variant", "p99 overall", "p99 2nd half", "p90 2nd half", "mean 2nd half",
             "eastus2 share 2nd half", "delivered TPM", "delivered TPM 2nd half",
             "client 429s"], rows))
    if "cotenant" in res:
        sc = res["cotenant"]
        rows = []
        for v in ("on", "off"):
            r = sc[v]
            st = r["steady"]
            rows.append([f"learned_capacity {on_off[v]}",
                         report.pct(r["whole"]["upstream_429_rate"], 2),
                         report.pct(st["upstream_429_rate"], 2),
                         f"{st['upstream_calls']:,.0f}",
                         f"{r['whole']['delivered_tpm'] / 1000:,.0f}K",
                         f"{st['delivered_tpm'] / 1000:,.0f}K",
                         f"{(st['per_region_tpm']['canadaeast'] + st['per_region_tpm']['australiaeast']) / 1000:,.0f}K",  # noqa: E501
                         report.pct(r["all_clients"]["rejected_429"], 1),
                         report.ms(r["all_clients"]["p99"])])
        out.append(f"### {sc['title']}\n\n" + report.table(
            ["variant", "upstream 429s (whole run)", "upstream 429s (steady)",
             "upstream calls (steady)", "delivered TPM", "delivered TPM (steady)",
             "of which canadaeast + australiaeast", "client 429s", "client p99"], rows))
    if "burst" in res:
        sc = res["burst"]
        rows = []
        for v in ("on", "off"):
            r = sc[v]
            b = r["clients"]["burst"]
            aw = r["admission_wait"]
            p99w = aw["p99_bucket_s"]
            rows.append([f"admission_queue {on_off[v]}", f"{b['sent']:,}",
                         report.pct(b["rejected_429"], 1),
                         report.ms(b["p99"]), report.ms(b["p50"]),
                         f"{aw['queued']:,.0f}",
                         "n/a" if p99w is None else f"≤ {p99w:g} s",
                         report.pct(r["all_clients"]["rejected_429"], 1),
                         report.pct(r["whole"]["upstream_429_rate"], 2),
                         f"{r['whole']['delivered_tpm'] / 1000:,.0f}K",
                         f"{r['burst_window']['delivered_tpm'] / 1000:,.0f}K"])
        out.append(f"### {sc['title']}\n\n" + report.table(
            ["variant", "burst requests", "burst client 429s", "burst p99 (wait incl.)",
             "burst p50",
             "requests queued", "admission wait p99", "all client 429s", "upstream 429s",
             "delivered TPM", "delivered TPM in burst"], rows))
    s = record["settings"]
    out.append(
        f"Reference regions of {s['config']} ({record['total_tpm']:,} TPM, "
        f"{len(record['regions'])} regions), {s['replicas']} gateway replicas sharing Redis, "
        f"mean request cost {s['mean_cost']:,.0f} tokens (prompt {s['prompt_tokens']}, "
        f"max_tokens {s['max_tokens']}, {s['stream_fraction']:.0%} streamed). "
        + " ".join(f"{v['title']}: {v['description']}" for v in res.values())
        + " Latency: successful requests as clients saw them (streams: to the last byte); "
        "TPM per simulated minute of estimated cost admitted by the regions.")
    if s["quick"]:
        out.append("**--quick: smoke settings, not a measurement.**")
    return "\n\n".join(out)


def describe(sc: Scenario) -> str:
    ph = "; ".join(f"{p.name} {p.demand:g}x from {p.start:g} s for {p.duration:g} s"
                   for p in sc.phases)
    ev = "; ".join(f"{e.region} {e.knobs} at {e.at:g} s" for e in sc.events)
    return (f"time x{sc.time_scale:g} ({sc.duration:g} real s = "
            f"{sc.duration * sc.time_scale / 60:.3g} simulated min per run); load: {ph}"
            + (f"; simulator: {ev}" if ev else "") + ".")


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    regions, keep = reference_regions(args.config, args.model)
    names = {r.name for r in regions}
    all_sc = scenarios(args.quick)
    chosen = [all_sc[k] for k in args.scenarios]
    for sc in chosen:
        missing = {e.region for e in sc.events} - names
        if missing:
            raise SystemExit(f"{args.config}: scenario {sc.key} needs regions {missing}")
    mix = load_mix(args)
    mc = mean_cost(mix)
    require_redis()
    workdir, progress = workspace("scenarios")
    results: dict[str, Any] = {}
    db = 0
    with redis_server(workdir) as redis_port:
        for sc in chosen:
            entry: dict[str, Any] = {"title": sc.title, "feature": sc.feature,
                                     "description": describe(sc)}
            for variant in ("on", "off"):
                entry[variant] = run_variant(sc, variant, regions, keep, args, mix, mc,
                                             workdir, db, redis_port, progress)
                db += 1
                c = entry[variant]["all_clients"]
                progress.done(f"{sc.title}: {sc.feature} {variant.upper()}: sent {c['sent']}, "
                              f"client 429s {c['rejected_429']:.1%}, p99 "
                              f"{report.ms(c['p99'])}, upstream 429s "
                              f"{entry[variant]['whole']['upstream_429_rate']:.2%}")
            results[sc.key] = entry
    return {
        "kind": "scenarios", "machine": report.machine(),
        "settings": {"config": args.config, "model": args.model, "quick": args.quick,
                     "replicas": args.replicas, "clients": args.clients, "mean_cost": mc,
                     "prompt_tokens": mix.prompt_tokens, "max_tokens": mix.max_tokens,
                     "stream_fraction": mix.stream_fraction, "seed": args.seed,
                     "defaults_of_other_policies": DEFAULTS, "gateway": keep},
        "total_tpm": sum(r.tpm for r in regions), "regions": {r.name: r.tpm for r in regions},
        "scenarios": results, "logs": str(workdir)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(ROOT / "regions.yaml"),
                   help="the regions and TPM to simulate (default: the repository's "
                        "regions.yaml; needs eastus2, canadaeast and australiaeast)")
    p.add_argument("--model", default="gpt-4")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: every run a few seconds, no thresholds")
    p.add_argument("--scenarios", default="slow,cotenant,burst",
                   type=report.comma_list,
                   help="comma-separated subset of slow,cotenant,burst")
    p.add_argument("--replicas", type=int, default=3, help="gateway processes (3)")
    p.add_argument("--clients", type=int, default=2,
                   help="most load processes per load phase (2)")
    add_load_arguments(p)
    report.add_output_arguments(p)


def main(argv: list[str] | None = None) -> int:
    args = report.parser("scenarios", __doc__, add_arguments).parse_args(argv)
    report.check_known("scenarios", args.scenarios, ("slow", "cotenant", "burst"))
    return report.execute("scenarios", "## Scenarios: beyond static quotas", run, render, args)


if __name__ == "__main__":
    sys.exit(main())
