"""Clients of one pool: a client's own budget, and fair share when the pool runs short.

    balancer bench fairness            # from the repository root (~2.5 min)
    balancer bench fairness --quick    # the CI smoke: a few seconds per run

One model on three simulated regions (100K + 60K + 40K = 200K TPM; the simulator
enforces each region's TPM and answers 429 as Azure does), two `balancer serve`
replicas sharing one Redis (a private redis-server), open-loop load processes
(bench/loadgen.py, the section 1 mix), one or two per client, each with the client's
key and sending to both replicas in turn. Time is compressed (10x: a simulated minute
lasts 6 s). Each run has a fresh simulator and Redis database.

  budget:   one client with a tpm budget of 20% of the pool, sending at 2x its budget.
            Upstream admitted tokens (all the client's: it is alone) against its budget
            over the run, plus one burst (its bucket: burst_seconds of tpm, full at the
            start); its 429s by x-balancer-limit.
  fairness: a greedy client at 3x the pool and a modest one at 0.3x, the same weight, no
            budgets; fair_share enabled, then `fair_share: {enabled: false}`.
  weighted: two greedy clients, weights 2 and 1, each at 1.5x the pool, fair share on:
            the split of what the pool served.

Refusals are read from the replicas' /metrics (balancer_client_limited_total by reason:
rpm, tpm, day, month, fair_share, no_capacity), tokens served per client from the usage
the clients received, and the pool from the simulator's counters.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balancer.config import FairShare, GatewayConfig
from bench import report
from bench.harness import (
    Loads,
    Region,
    Sampler,
    add_load_arguments,
    bench_config,
    client_summary,
    load_mix,
    mean_cost,
    redis_server,
    require_redis,
    serve_cmd,
    simulate_cmd,
    start_pool,
    wait_until,
    workspace,
)
from bench.loadgen import Mix, merge
from bench.procs import Procs, get_text
from bench.scenarios import DEFAULTS

POOL = [Region("eastus2", 100_000, 600), Region("canadaeast", 60_000, 360),
        Region("francecentral", 40_000, 240)]
BURST_SECONDS = GatewayConfig.burst_seconds
FAIR_ON = {"enabled": True, "window_seconds": FairShare.window_seconds,
           "headroom": FairShare.headroom}
FAIR_OFF = {"enabled": False}
TARGETS = {"budget_max": 1.05, "budget_min": 0.85, "modest_served": 0.99,
           "pool_delivered": 0.90, "upstream_429": 0.01}
LIMIT_REASONS = ("rpm", "tpm", "day", "month", "fair_share", "no_capacity")


@dataclass
class Tenant:
    """A client of the pool: `demand` is its offered estimated tokens as a multiple of
    the pool's TPM; `tpm` its budget on the model (None: none)."""

    name: str
    demand: float
    weight: float = 1.0
    tpm: int | None = None

    @property
    def key(self) -> str:
        return f"bench-fairness-{self.name}"

    def entry(self, model: str) -> dict[str, Any]:
        """Its regions.yaml entry (the key's SHA-256: the file holds no secret)."""
        out: dict[str, Any] = {"name": self.name, "weight": self.weight,
                               "key_sha256": hashlib.sha256(self.key.encode()).hexdigest()}
        if self.tpm:
            out["budgets"] = {model: {"tpm": self.tpm}}
        return out


@dataclass
class Case:
    key: str
    title: str
    tenants: list[Tenant]
    fair: dict[str, Any]
    duration: float  # real seconds of load


def pool_tpm() -> int:
    return sum(r.tpm for r in POOL)


def cases(args: argparse.Namespace) -> list[Case]:
    budget = round(args.budget_share * pool_tpm())
    out = []
    if "budget" in args.scenarios:
        out.append(Case("budget", f"(a) one client at {args.budget_demand:g}x its tpm budget "
                        f"({budget:,} TPM, {args.budget_share:.0%} of the pool)",
                        [Tenant("budgeted", args.budget_demand * args.budget_share,
                                tpm=budget)], FAIR_ON, args.seconds))
    if "fairness" in args.scenarios:
        pair = [Tenant("greedy", args.greedy), Tenant("modest", args.modest)]
        out += [Case("fair-on", "(b) greedy + modest, fair_share enabled", pair, FAIR_ON,
                     args.seconds),
                Case("fair-off", "(b) greedy + modest, fair_share disabled", pair, FAIR_OFF,
                     args.seconds)]
    if "weighted" in args.scenarios:
        out.append(Case("weighted", "(c) two greedy clients, weights 2:1, fair_share enabled",
                        [Tenant("heavy", args.weighted_demand, weight=2.0),
                         Tenant("light", args.weighted_demand, weight=1.0)], FAIR_ON,
                        args.weighted_seconds))
    return out


# --------------------------------------------------------------------------- one run


def scrape(urls: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """The per-client counters of every replica, summed: limited (by reason), requests
    (by status), tokens (by kind)."""
    names = {"balancer_client_limited_total": ("limited", "reason"),
             "balancer_client_requests_total": ("requests", "status"),
             "balancer_client_tokens_total": ("tokens", "kind")}
    out: dict[str, dict[str, dict[str, float]]] = {v[0]: {} for v in names.values()}
    for url in urls:
        for line in get_text(url + "/metrics").splitlines():
            name, _, rest = line.partition("{")
            if name not in names:
                continue
            kind, by = names[name]
            labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
            per = out[kind].setdefault(labels["client"], {})
            per[labels[by]] = per.get(labels[by], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_case(case: Case, args: argparse.Namespace, mix: Mix, mc: float, workdir: Path,
             db: int, redis_port: int, progress: report.Progress) -> dict[str, Any]:
    ts = args.time_scale
    wd = workdir / case.key
    wd.mkdir(parents=True, exist_ok=True)
    sections = {**DEFAULTS, "fair_share": case.fair,
                "clients": [t.entry(args.model) for t in case.tenants]}
    config = wd / "regions.yaml"
    config.write_text(bench_config(POOL, args.model, {"time_scale": ts, "max_attempts": 3,
                                                      "burst_seconds": BURST_SECONDS},
                                   sections))
    with Procs(wd) as procs:
        sim, replicas = start_pool(procs, f"redis://127.0.0.1:{redis_port}/{db}",
                                   args.log_level, simulate_cmd(config, ts, args.seed),
                                   serve_cmd(config), args.replicas, health="/readyz")
        t0 = time.time() + (1.0 if args.quick else 1.5)
        loads = Loads(procs, mix, args.seed * 1000)
        for t in case.tenants:
            rate = t.demand * pool_tpm() * ts / 60 / mc
            count = max(1, min(args.clients, round(rate / 25)))
            for _ in range(count):
                loads.spawn(t.name, replicas, rate / count, case.duration, start_at=t0,
                            api_key=t.key)
        sampler = Sampler(sim, args.model, args.sample_interval)
        started = wait_until(t0)
        sampler.take()
        loads.wait(started, case.duration, progress, lambda elapsed: report.running(
            "fairness", f"{case.key:8s}", elapsed, case.duration))
        sampler.take()
        per_client = loads.reports()
        metrics = scrape(replicas)
    (_, first), (_, last) = sampler.samples[0], sampler.samples[-1]

    def upstream(key: str) -> float:
        return sum(last[r.name][key] - first[r.name][key] for r in POOL)

    minutes = case.duration * ts / 60
    bucket = sum(last[r.name]["max_tokens_over_window"] - r.tpm for r in POOL)
    deliverable = pool_tpm() * minutes + bucket
    calls, throttled = upstream("requests"), upstream("throttled")
    result: dict[str, Any] = {
        "key": case.key, "title": case.title, "fair_share": case.fair, "minutes": minutes,
        "seconds": case.duration,
        "tenants": [{"name": t.name, "demand": t.demand, "weight": t.weight, "tpm": t.tpm}
                    for t in case.tenants],
        "pool": {"tpm": pool_tpm(), "bucket_tokens": bucket, "deliverable_tokens": deliverable,
                 "admitted_tokens": upstream("admitted_tokens"),
                 "delivered": upstream("admitted_tokens") / deliverable,
                 "upstream_calls": calls, "upstream_429": throttled,
                 "upstream_429_rate": throttled / max(1.0, calls)},
        "clients": {}, "logs": str(wd)}
    for t in case.tenants:
        rep = merge(per_client[t.name])
        summary = client_summary(rep)
        limited = {k: v for k, v in metrics["limited"].get(t.name, {}).items() if v}
        refused = summary["statuses"].get("429", 0)
        summary.update({
            "served": summary["ok"] / max(1, summary["sent"]),
            # what the regions reported in usage for its requests, streams included
            # (the load generator does not ask streams for their usage)
            "usage_tokens": sum(metrics["tokens"].get(t.name, {}).values()),
            "client_seen_usage_tokens": rep["tokens"].get("prompt", 0)
            + rep["tokens"].get("completion", 0),
            "limited": limited,
            # 429s after the request reached a region (every attempt refused upstream)
            "other_429": refused - round(sum(limited.values())),
            "gateway_requests": metrics["requests"].get(t.name, {})})
        result["clients"][t.name] = summary
    if case.key == "budget":
        (t,) = case.tenants
        assert t.tpm is not None
        budget, burst = t.tpm * minutes, t.tpm * BURST_SECONDS / 60
        admitted = result["pool"]["admitted_tokens"]
        result["budget"] = {"tpm": t.tpm, "budget_tokens": budget, "burst_tokens": burst,
                            "admitted_tokens": admitted, "of_budget": admitted / budget,
                            "of_budget_and_burst": admitted / (budget + burst)}
    served = sum(c["usage_tokens"] for c in result["clients"].values())
    for c in result["clients"].values():
        c["share_of_served"] = c["usage_tokens"] / served if served else 0.0
    return result


# --------------------------------------------------------------------------- output


def refusals(c: dict[str, Any]) -> str:
    """A client's 429s by what refused them."""
    parts = [f"{k} {v:,.0f}" for k, v in sorted(c["limited"].items())]
    if c["other_429"]:
        parts.append(f"upstream {c['other_429']:,}")
    return ", ".join(parts) or "none"


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(record: dict[str, Any]) -> str:
    s, runs = record["settings"], {r["key"]: r for r in record["runs"]}
    out = []
    if "budget" in runs:
        r = runs["budget"]
        b, c, p = r["budget"], r["clients"]["budgeted"], r["pool"]
        ratio = b["of_budget_and_burst"]
        rows = [
            ["budget", f"{b['tpm']:,} TPM", "", f"{s['budget_share']:.0%} of the pool"],
            ["offered", f"{c['sent']:,} requests",
             "", f"{s['budget_demand']:g}x the budget, both replicas"],
            ["budget over the run", f"{b['budget_tokens']:,.0f}", "",
             f"{r['minutes']:.3g} simulated min x tpm"],
            ["one burst (the bucket)", f"{b['burst_tokens']:,.0f}", "",
             f"{s['burst_seconds']:g} s of tpm"],
            ["upstream admitted (estimated cost)", f"{b['admitted_tokens']:,.0f}", "",
             "the simulator's counter; the client is alone"],
            ["admitted / (budget + burst)", report.pct(ratio),
             f"{s['targets']['budget_min']:.0%}-{s['targets']['budget_max']:.0%}",
             met(s["targets"]["budget_min"] <= ratio <= s["targets"]["budget_max"])],
            ["admitted / budget", report.pct(b["of_budget"]), "", ""],
            ["served", f"{c['ok']:,} ({report.pct(c['served'])})", "",
             f"{c['usage_tokens']:,.0f} tokens used (usage)"],
            ["429 with x-balancer-limit: tpm", f"{c['limited'].get('tpm', 0):,.0f}", "",
             f"all 429s: {refusals(c)}"],
            ["upstream 429s", f"{p['upstream_429']:,.0f} of {p['upstream_calls']:,.0f}", "",
             ""]]
        out.append(f"### {r['title']}\n\n" + report.table(
            ["measure", "value", "target", "detail"], rows, "lrrl"))
    pair = [runs[k] for k in ("fair-on", "fair-off") if k in runs]
    if pair:
        rows = []
        for r in pair:
            g, m, p = r["clients"]["greedy"], r["clients"]["modest"], r["pool"]
            rows.append([
                "fair_share ON" if r["fair_share"]["enabled"] else "fair_share OFF",
                f"**{report.pct(m['served'])}** ({m['ok']:,}/{m['sent']:,})", refusals(m),
                f"{report.pct(g['served'])} ({g['ok']:,}/{g['sent']:,})", refusals(g),
                f"{g['usage_tokens'] / 1000:,.0f}K ({report.pct(g['share_of_served'])})",
                f"{m['usage_tokens'] / 1000:,.0f}K",
                report.pct(p["delivered"]), report.pct(p["upstream_429_rate"], 2),
                f"{p['upstream_calls']:,.0f}"])
        t = s["targets"]
        out.append(f"### (b) greedy at {s['greedy']:g}x the pool, modest at {s['modest']:g}x, "
                   "the same weight, no budgets\n\n" + report.table(
                       ["variant", "modest served", "modest 429s by cause", "greedy served",
                        "greedy 429s by cause", "greedy tokens served (share)",
                        "modest tokens served", "pool delivered", "upstream 429s",
                        "upstream calls"], rows)
                   + f"\n\nTargets with fair share ON: modest served ≥ "
                     f"{t['modest_served']:.0%}, pool delivered ≥ {t['pool_delivered']:.0%} "
                     f"of what it can deliver, upstream 429s ≤ {t['upstream_429']:.0%} of "
                     "upstream calls.")
    if "weighted" in runs:
        r = runs["weighted"]
        weights = sum(t["weight"] for t in r["tenants"])
        rows = [[t["name"], f"{t['weight']:g}", f"{t['demand']:g}x",
                 f"{r['clients'][t['name']]['usage_tokens'] / 1000:,.0f}K",
                 report.pct(r["clients"][t["name"]]["share_of_served"]),
                 report.pct(t["weight"] / weights),
                 report.pct(r["clients"][t["name"]]["served"]), refusals(r["clients"][t["name"]])]
                for t in r["tenants"]]
        out.append(f"### {r['title']}\n\n" + report.table(
            ["client", "weight", "demand", "tokens served", "share of served",
             "weight share", "requests served", "429s by cause"], rows)
            + f"\n\nPool delivered {report.pct(r['pool']['delivered'])}, upstream 429s "
              f"{report.pct(r['pool']['upstream_429_rate'], 2)}.")
    out.append(
        f"Pool: {', '.join(f'{r.name} {r.tpm // 1000}K' for r in POOL)} = "
        f"{pool_tpm() // 1000}K TPM; {s['replicas']} replicas sharing Redis; time "
        f"x{s['time_scale']:g}, {s['seconds']:g} real s per run "
        f"({s['seconds'] * s['time_scale'] / 60:.3g} simulated min"
        + (f"; (c) {s['weighted_seconds']:g} s" if "weighted" in runs else "")
        + f"); mean request cost "
        f"{s['mean_cost']:,.0f} tokens (prompt {s['prompt_tokens']}, max_tokens "
        f"{s['max_tokens']}, {s['stream_fraction']:.0%} streamed). Delivered = estimated "
        "tokens the regions admitted / (TPM x minutes + the buckets they start with); "
        "tokens served = the usage the regions reported for a client's requests "
        "(balancer_client_tokens_total). 429s by cause: x-balancer-limit "
        "(tpm, fair_share), no_capacity = the pool could not serve it (no "
        "x-balancer-limit), upstream = every attempt refused by a region.")
    if s["quick"]:
        out.append("**--quick: smoke settings, not a measurement.**")
    return "\n\n".join(out)


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_redis()
    mix = load_mix(args)
    mc = mean_cost(mix)
    workdir, progress = workspace("fairness")
    runs = []
    with redis_server(workdir) as redis_port:
        for db, case in enumerate(cases(args)):
            result = run_case(case, args, mix, mc, workdir, db, redis_port, progress)
            runs.append(result)
            progress.done(f"{case.title}: " + "; ".join(
                f"{name} served {c['served']:.1%} ({refusals(c)})"
                for name, c in result["clients"].items())
                + f"; pool {result['pool']['delivered']:.1%}, upstream 429s "
                  f"{result['pool']['upstream_429_rate']:.2%}")
    return {"kind": "fairness", "machine": report.machine(),
            "settings": {"model": args.model, "quick": args.quick, "seed": args.seed,
                         "time_scale": args.time_scale, "seconds": args.seconds,
                         "weighted_seconds": args.weighted_seconds,
                         "replicas": args.replicas, "regions": {r.name: r.tpm for r in POOL},
                         "pool_tpm": pool_tpm(), "burst_seconds": BURST_SECONDS,
                         "budget_share": args.budget_share,
                         "budget_demand": args.budget_demand, "greedy": args.greedy,
                         "modest": args.modest, "weighted_demand": args.weighted_demand,
                         "fair_share": FAIR_ON, "mean_cost": mc,
                         "prompt_tokens": mix.prompt_tokens, "max_tokens": mix.max_tokens,
                         "stream_fraction": mix.stream_fraction, "targets": TARGETS,
                         "other_policies": DEFAULTS},
            "runs": runs, "logs": str(workdir)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt-4")
    p.add_argument("--quick", action="store_true", help="CI smoke: a few seconds per run")
    p.add_argument("--scenarios", default="budget,fairness,weighted", type=report.comma_list,
                   help="comma-separated subset of budget,fairness,weighted")
    p.add_argument("--time-scale", type=float, default=10.0,
                   help="time compression (10: a simulated minute lasts 6 s)")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="real seconds of load per budget and fairness run (30)")
    p.add_argument("--weighted-seconds", type=float, default=20.0,
                   help="real seconds of load of the weighted run (20)")
    p.add_argument("--budget-share", type=float, default=0.2,
                   help="budget: the client's tpm as a share of the pool (0.2)")
    p.add_argument("--budget-demand", type=float, default=2.0,
                   help="budget: offered load as a multiple of the budget (2)")
    p.add_argument("--greedy", type=float, default=3.0,
                   help="fairness: the greedy client's demand, x the pool (3)")
    p.add_argument("--modest", type=float, default=0.3,
                   help="fairness: the modest client's demand, x the pool (0.3)")
    p.add_argument("--weighted-demand", type=float, default=1.5,
                   help="weighted: each client's demand, x the pool (1.5)")
    p.add_argument("--replicas", type=int, default=2, help="gateway processes (2)")
    p.add_argument("--clients", type=int, default=2, help="most load processes per client (2)")
    add_load_arguments(p)
    report.add_output_arguments(p)


def main(argv: list[str] | None = None) -> int:
    args = report.parser("fairness", __doc__, add_arguments).parse_args(argv)
    report.check_known("scenarios", args.scenarios, ("budget", "fairness", "weighted"))
    if args.quick:
        args.seconds, args.weighted_seconds = 2.0, 2.0
        args.time_scale = max(args.time_scale, 30.0)
    return report.execute("fairness", "## Clients: budgets and fair share", run, render, args)


if __name__ == "__main__":
    sys.exit(main())
