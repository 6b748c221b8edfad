"""Learned capacity under every rate-limit header style a region may send.

    balancer bench learning            # from the repository root (~3.5 min)
    balancer bench learning --quick    # the CI smoke: a few seconds per run

Regions differ in what their 429s say (the simulator's `throttle_headers`, one style of a
real upstream each): azure (remaining tokens on successes and 429s, retry-after-ms),
precise (retry-after-ms, remaining tokens on successes only: an independent tester's
Azure look-alike), seconds (a whole-second retry-after, remaining -1: Azure's Responses
API, microsoft/aoai-api-simulator), retry-after-only (no x-ratelimit-* headers at all).
Each scenario runs once per style, learned capacity ON then OFF, on a fresh simulator:

  solo:     the tester's scenario: one region configured at 600K TPM that really grants
            300K (a hidden co-tenant takes the rest), demand 1.6x its configured TPM, one
            `balancer serve` replica. Upstream 429s over the whole run, warm-up included,
            and delivered = tokens the region admitted / what it could admit (its real
            refill over the run plus the full bucket it starts with).
  cotenant: section 3 (b) of BENCHMARKS.md (the reference regions, half of canadaeast and
            australiaeast taken by a co-tenant, 1.0x demand, 3 replicas sharing Redis),
            shorter.

Machinery of bench/scenarios.py (processes, Redis, open-loop load, compressed time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.harness import (
    Loads,
    Poller,
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
from bench.loadgen import Mix
from bench.procs import ROOT, Procs, get_json, post_json
from bench.scenarios import DEFAULTS, Event, Phase, Scenario, run_variant

# The header styles, by the simulator's `throttle_headers` value of each.
STYLES = {"azure": "normal", "precise": "precise", "seconds": "seconds",
          "retry-after-only": "retry-after-only"}
SOLO, SOLO_TPM, SOLO_REAL = "solo", 600_000, 300_000
TARGETS = {"upstream_429": 0.015, "delivered": 0.95}


class Factors(Poller):
    """Polls a replica's GET /regions: the learned factor of each region."""

    samples: list[tuple[float, dict[str, float]]]

    def take(self) -> None:
        rows = get_json(f"{self.url}/regions")["models"][self.model]
        self.samples.append((time.monotonic(),
                             {r["region"]: r["capacity_factor"] for r in rows}))


def run_solo(style: str, learn: bool, args: argparse.Namespace, mix: Mix, mc: float,
             workdir: Path, db: int, redis_port: int, progress: report.Progress
             ) -> dict[str, Any]:
    """One run of the tester's scenario; the upstream counters over the whole run."""
    ts, duration = args.time_scale, args.solo_seconds
    variant = "on" if learn else "off"
    wd = workdir / f"solo-{style}-{variant}"
    wd.mkdir(parents=True, exist_ok=True)
    sections = {**DEFAULTS, "learned_capacity": {"enabled": learn}}
    config = wd / "regions.yaml"
    keep = {"time_scale": ts, "max_attempts": 3}
    config.write_text(bench_config([Region(SOLO, SOLO_TPM, SOLO_TPM * 6 // 1000)], args.model,
                                   keep, sections))
    with Procs(wd) as procs:
        sim, (gw,) = start_pool(procs, f"redis://127.0.0.1:{redis_port}/{db}", args.log_level,
                                simulate_cmd(config, ts, args.seed, "--throttle-headers",
                                             STYLES[style]),
                                serve_cmd(config), 1, health="/readyz")
        post_json(f"{sim}/_sim/regions/{SOLO}", {"cotenant_tpm": SOLO_TPM - SOLO_REAL})
        rate = args.demand * SOLO_TPM * ts / 60 / mc
        count = max(1, min(args.clients, round(rate / 40)))
        t0 = time.time() + 0.5
        loads = Loads(procs, mix, args.seed * 1000)
        for _ in range(count):
            loads.spawn("solo", [gw], rate / count, duration, start_at=t0)
        sampler, factors = Sampler(sim, args.model, args.sample_interval), \
            Factors(gw, args.model, args.sample_interval)
        started = wait_until(t0)
        sampler.take()
        label = f"solo {style} {variant.upper()}"
        with sampler, factors:
            loads.wait(started, duration, progress,
                       lambda elapsed: report.running("learning", label, elapsed, duration))
        sampler.take()
        client = client_summary(loads.merged())
    end = started + duration

    def count_of(key: str) -> float:
        return at(sampler.samples, end, SOLO, key) - at(sampler.samples, started, SOLO, key)

    minutes = duration * ts / 60
    calls, throttled = count_of("requests"), count_of("throttled")
    # What the region could admit: its real refill over the run, plus its full bucket at
    # the start (10 s of the configured quota: the co-tenant drains the refill, not it).
    deliverable = SOLO_REAL * minutes + SOLO_TPM / 6
    admitted = count_of("admitted_tokens")
    values = [f[SOLO] for t, f in factors.samples if started <= t <= end]
    late = [f[SOLO] for t, f in factors.samples if end - duration / 3 <= t <= end]
    return {"style": style, "variant": variant, "minutes": minutes, "upstream_calls": calls,
            "upstream_429": throttled, "upstream_429_rate": throttled / max(1.0, calls),
            "admitted_tokens": admitted, "deliverable_tokens": deliverable,
            "delivered": admitted / deliverable, "delivered_tpm": admitted / minutes,
            "factor_mean": sum(values) / len(values) if values else None,
            "factor_last_third": sum(late) / len(late) if late else None,
            "factor_min": min(values, default=None), "clients": client}


def cotenant_scenario(style: str, args: argparse.Namespace) -> Scenario:
    """Section 3 (b), its regions answering in `style`, shorter."""
    knobs = {"throttle_headers": STYLES[style]}
    taken = {"canadaeast": 50_000, "australiaeast": 20_000}
    names = args.cotenant_regions
    return Scenario(
        "cotenant", f"(b) hidden co-tenant, {style} headers", "learned_capacity",
        on={"enabled": True}, off={"enabled": False}, time_scale=args.time_scale,
        duration=args.cotenant_seconds,
        phases=[Phase("steady", 0, args.cotenant_seconds, 1.0)],
        events=[Event(0, name, {**knobs, **({"cotenant_tpm": taken[name]}
                                            if name in taken else {})}) for name in names])


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_redis()
    mix = load_mix(args)
    mc = mean_cost(mix)
    workdir, progress = workspace("learning")
    regions, keep = reference_regions(args.config, args.model)
    args.cotenant_regions = [r.name for r in regions]
    record: dict[str, Any] = {"solo": [], "cotenant": []}
    db = 0
    with redis_server(workdir) as redis_port:
        for style in args.styles:
            if "solo" in args.scenarios:
                for learn in (True, False):
                    result = run_solo(style, learn, args, mix, mc, workdir, db, redis_port,
                                      progress)
                    db += 1
                    record["solo"].append(result)
                    progress.done(
                        f"solo {style} learning {result['variant'].upper()}: upstream 429s "
                        f"{result['upstream_429_rate']:.2%}, delivered "
                        f"{result['delivered']:.1%}, factor {result['factor_mean']}")
            if "cotenant" in args.scenarios:
                sc = cotenant_scenario(style, args)
                entry: dict[str, Any] = {"style": style}
                for variant in ("on", "off"):
                    entry[variant] = run_variant(sc, variant, regions, keep, args, mix, mc,
                                                 workdir / style, db, redis_port, progress)
                    db += 1
                    progress.done(f"cotenant {style} learning {variant.upper()}: upstream "
                                  f"429s {entry[variant]['whole']['upstream_429_rate']:.2%}")
                record["cotenant"].append(entry)
    return {"kind": "learning", "machine": report.machine(),
            "settings": {"time_scale": args.time_scale, "solo_seconds": args.solo_seconds,
                         "cotenant_seconds": args.cotenant_seconds, "demand": args.demand,
                         "quick": args.quick, "replicas": args.replicas, "mean_cost": mc,
                         "prompt_tokens": mix.prompt_tokens, "max_tokens": mix.max_tokens,
                         "stream_fraction": mix.stream_fraction, "seed": args.seed,
                         "targets": TARGETS},
            "results": record, "logs": str(workdir)}


def render(record: dict[str, Any]) -> str:
    s, res = record["settings"], record["results"]
    out = []
    if res["solo"]:
        rows = []
        for r in res["solo"]:
            rows.append([r["style"], f"learning {r['variant'].upper()}",
                         report.pct(r["upstream_429_rate"], 2), f"{r['upstream_calls']:,.0f}",
                         report.pct(r["delivered"], 1),
                         f"{r['delivered_tpm'] / 1000:,.0f}K",
                         "n/a" if r["factor_mean"] is None else f"{r['factor_mean']:.2f}",
                         "n/a" if r["factor_last_third"] is None
                         else f"{r['factor_last_third']:.2f}",
                         report.pct(r["clients"]["rejected_429"], 1)])
        minutes = res["solo"][0]["minutes"]
        out.append(
            f"### One region configured at {SOLO_TPM // 1000}K TPM, really {SOLO_REAL // 1000}K "
            f"(hidden co-tenant), {s['demand']:g}x demand, one replica\n\n" + report.table(
                ["headers", "variant", "upstream 429s (whole run)", "upstream calls",
                 "delivered (of deliverable)", "delivered TPM", "mean factor",
                 "factor, last third", "client 429s"], rows)
            + f"\n\n{minutes:.3g} simulated minutes per run (time x{s['time_scale']:g}), "
              f"warm-up included; truth: factor 0.50.")
    if res["cotenant"]:
        rows = []
        for entry in res["cotenant"]:
            for v in ("on", "off"):
                r = entry[v]
                rows.append([entry["style"], f"learning {v.upper()}",
                             report.pct(r["whole"]["upstream_429_rate"], 2),
                             f"{r['whole']['upstream_calls']:,.0f}",
                             f"{r['whole']['delivered_tpm'] / 1000:,.0f}K",
                             report.pct(r["all_clients"]["rejected_429"], 1)])
        out.append("### Section 3 (b), hidden co-tenant on canadaeast and australiaeast, per "
                   "header style\n\n" + report.table(
                       ["headers", "variant", "upstream 429s (whole run)", "upstream calls",
                        "delivered TPM", "client 429s"], rows)
                   + f"\n\n{s['cotenant_seconds']:g} real s per run (time x"
                     f"{s['time_scale']:g}), {s['replicas']} replica"
                     f"{'s' if s['replicas'] != 1 else ''} sharing Redis; "
                     "450K TPM really available.")
    if s["quick"]:
        out.append("**--quick: smoke settings, not a measurement.**")
    return "\n\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(ROOT / "regions.yaml"),
                   help="the regions of the cotenant scenario (default: regions.yaml)")
    p.add_argument("--model", default="gpt-4")
    p.add_argument("--quick", action="store_true", help="CI smoke: a few seconds per run")
    p.add_argument("--scenarios", default="solo,cotenant", type=report.comma_list,
                   help="comma-separated subset of solo,cotenant")
    p.add_argument("--styles", default=",".join(STYLES), type=report.comma_list,
                   help=f"comma-separated subset of {','.join(STYLES)}")
    p.add_argument("--time-scale", type=float, default=20.0,
                   help="time compression (20: a simulated minute lasts 3 s)")
    p.add_argument("--solo-seconds", type=float, default=12.0,
                   help="real seconds of load per solo run (12: 4 simulated minutes)")
    p.add_argument("--cotenant-seconds", type=float, default=6.0,
                   help="real seconds of load per cotenant run")
    p.add_argument("--demand", type=float, default=1.6,
                   help="solo: offered load as a multiple of the configured TPM (1.6)")
    p.add_argument("--replicas", type=int, default=3, help="cotenant: gateway processes (3)")
    p.add_argument("--clients", type=int, default=2, help="most load processes per run (2)")
    add_load_arguments(p)
    report.add_output_arguments(p)


def main(argv: list[str] | None = None) -> int:
    args = report.parser("learning", __doc__, add_arguments).parse_args(argv)
    report.check_known("styles", args.styles, STYLES)
    report.check_known("scenarios", args.scenarios, ("solo", "cotenant"))
    if args.quick:
        args.solo_seconds, args.cotenant_seconds = 2.0, 2.0
    return report.execute("learning", "## Learned capacity per header style", run, render, args)


if __name__ == "__main__":
    sys.exit(main())
