"""Provisioned throughput first, standard (pay-as-you-go) only for the excess.

    balancer bench ptu            # from the repository root (~1.5 min)
    balancer bench ptu --quick    # the CI smoke: a few seconds, no thresholds

One provisioned (PTU) deployment whose `tpm` in regions.yaml is twice its real
throughput (a PTU's TPM is an estimate), beside standard regions, all priority 0. The
simulator serves the PTU as Azure does (admits while its utilization is under 100%,
corrects each request's estimate to its real cost when it ends, answers 429 with
`retry-after-ms` and no remaining-quota headers when full) at its real throughput;
3 `balancer serve` replicas share one Redis; open-loop load processes (bench/loadgen.py's
mix) send 2.5x the PTU's real throughput, so the standard regions must carry the rest.
Time is compressed (10x: a simulated minute lasts 6 s).

The table shows the PTU's learned capacity factor over time (`--learned-capacity off`
to compare; `--ptu-overstated 1` for a PTU configured at its real TPM).

Units: a PTU's throughput counts the tokens really used (prompt + completion), so the
PTU's share, the demand and the excess are in those; standard regions' quota counts
the estimate (prompt + max_tokens), shown beside.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from balancer.operations import OPERATIONS
from bench import report
from bench.harness import (
    API_VERSION,
    SIM_KEY,
    Loads,
    Poller,
    Sampler,
    add_load_arguments,
    at,
    client_summary,
    load_mix,
    mean_cost,
    require_redis,
    serve_cmd,
    simulate_cmd,
    start_pool,
    workspace,
)
from bench.loadgen import Mix
from bench.procs import Procs, get_json, get_text

PTU = "ptu-eastus2"
PAYG = {"payg-canadaeast": 100_000, "payg-uksouth": 100_000, "payg-australiaeast": 40_000}
TARGETS = {"client_failures": 0.005, "ptu_share": 0.90}


def config_text(model: str, ptu_tpm: int, gateway: dict[str, Any],
                sections: dict[str, Any] | None = None) -> str:
    """regions.yaml: the PTU at `ptu_tpm` (sku provisioned), the standard regions at
    their TPM; endpoints ${SIM_URL}, store ${STORE_URL}; `sections`: further top-level
    sections (JSON is YAML)."""
    lines = ['store: {url: "${STORE_URL}"}', f"gateway: {json.dumps(gateway)}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in (sections or {}).items()]
    lines.append("regions:")
    for name, tpm, sku in [(PTU, ptu_tpm, "provisioned"),
                           *((n, t, "standard") for n, t in PAYG.items())]:
        lines += [f"  - name: {name}", "    kind: azure", f"    endpoint: ${{SIM_URL}}/{name}",
                  f"    api_key: {SIM_KEY}", f'    api_version: "{API_VERSION}"',
                  "    deployments:",
                  f"      {model}: {{deployment: {model}, tpm: {tpm}, sku: {sku}}}"]
    return "\n".join(lines) + "\n"


def mean_used(mix: Mix, samples: int = 4000) -> float:
    """Mean tokens a request really uses: its prompt plus, as the simulator draws it, a
    completion of 0.5-1.0 of its budget (0.75 on average)."""
    operation = OPERATIONS["chat/completions"]
    rng = random.Random(12345)
    total = 0.0
    for _ in range(samples):
        body = mix.body(rng)
        total += operation.prompt_tokens(body) + 0.75 * body["max_tokens"]
    return total / samples


class RegionsSampler(Poller):
    """Polls one replica's GET /regions: the PTU's learned factor and cooldown."""

    samples: list[tuple[float, float, float]]  # (time, factor, cooldown)

    def take(self) -> None:
        rows = get_json(f"{self.url}/regions")["models"][self.model]
        row = next(r for r in rows if r["region"] == PTU)
        self.samples.append((time.monotonic(), row["capacity_factor"],
                             row["cooldown_seconds"]))


def scrape(urls: list[str]) -> dict[str, Any]:
    """The PTU-related series summed over replicas (the utilization gauge: per replica)."""
    out: dict[str, Any] = {"throttled": {}, "selections": {}, "spilled_requests": 0.0,
                           "spilled_tokens": 0.0, "utilization": []}
    for url in urls:
        for family in text_string_to_metric_families(get_text(url + "/metrics")):
            for s in family.samples:
                if s.name == "balancer_upstream_throttled_total":
                    key = s.labels["sku"]
                    out["throttled"][key] = out["throttled"].get(key, 0.0) + s.value
                elif s.name == "balancer_selections_total":
                    key = s.labels["region"]
                    out["selections"][key] = out["selections"].get(key, 0.0) + s.value
                elif s.name == "balancer_spilled_requests_total":
                    out["spilled_requests"] += s.value
                elif s.name == "balancer_spilled_tokens_total":
                    out["spilled_tokens"] += s.value
                elif s.name == "balancer_deployment_utilization_ratio":
                    out["utilization"].append(s.value)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_redis()
    ts, duration, warmup = args.time_scale, args.duration, args.warmup
    mix = load_mix(args)
    used, estimated = mean_used(mix), mean_cost(mix)
    demand_tpm = args.demand * args.ptu_tpm  # tokens really used per simulated minute
    rate = demand_tpm / used * ts / 60  # requests per real second
    gateway = {"time_scale": ts, "max_attempts": args.max_attempts}
    workdir, progress = workspace("ptu")
    gw_config, sim_config = workdir / "regions.yaml", workdir / "simulated.yaml"
    learning = {"learned_capacity": {"enabled": args.learned_capacity == "on"}}
    gw_config.write_text(config_text(args.model, round(args.ptu_tpm * args.ptu_overstated),
                                     gateway, learning))
    sim_config.write_text(config_text(args.model, args.ptu_tpm, gateway))  # the real TPM
    with Procs(workdir) as procs:
        sim, replicas = start_pool(procs, f"redis://127.0.0.1:{procs.redis()}/0",
                                   args.log_level, simulate_cmd(sim_config, ts, args.seed),
                                   serve_cmd(gw_config), args.replicas)
        sampler = Sampler(sim, args.model, args.sample_interval)
        factors = RegionsSampler(replicas[0], args.model, args.sample_interval * 2)
        sampler.take()
        loads = Loads(procs, mix, args.seed * 100)
        for _ in range(args.clients):
            loads.spawn("client", replicas, rate / args.clients, duration)
        started = time.monotonic()
        with sampler, factors:
            loads.wait(started, duration, progress,
                       lambda elapsed: report.running("ptu", "", elapsed, duration), tick=0.2)
        progress.done()
        sampler.take()
        metrics = scrape(replicas)
        client = loads.merged()
    settings = {"model": args.model, "time_scale": ts, "duration_s": duration,
                "warmup_s": warmup, "replicas": args.replicas, "clients": args.clients,
                "demand": args.demand, "ptu_real_tpm": args.ptu_tpm,
                "ptu_configured_tpm": round(args.ptu_tpm * args.ptu_overstated),
                "payg_tpm": PAYG, "max_attempts": args.max_attempts, "mean_used": used,
                "learned_capacity": args.learned_capacity,
                "mean_estimated": estimated, "rate_rps": rate, "quick": args.quick,
                "prompt_tokens": mix.prompt_tokens, "max_tokens": mix.max_tokens,
                "stream_fraction": mix.stream_fraction, "seed": args.seed}
    return {**analyse(settings, sampler.samples, factors.samples, started, metrics, client,
                      str(workdir)), "machine": report.machine()}


def analyse(settings: dict[str, Any], samples: list[tuple[float, dict[str, dict[str, int]]]],
            factors: list[tuple[float, float, float]], started: float, metrics: dict[str, Any],
            client: dict[str, Any], logs: str) -> dict[str, Any]:
    sim_minute = 60.0 / settings["time_scale"]
    t0, t1 = started + settings["warmup_s"], started + settings["duration_s"]
    minutes = (t1 - t0) / sim_minute

    def per_minute(region: str, *keys: str, a: float = t0, b: float = t1) -> float:
        return sum(at(samples, b, region, k) - at(samples, a, region, k)
                   for k in keys) / ((b - a) / sim_minute)

    def whole(region: str, key: str) -> float:
        return samples[-1][1][region][key] - samples[0][1][region][key]

    used = ("prompt_tokens", "completion_tokens")
    ptu_tpm = per_minute(PTU, *used)
    payg_tpm = sum(per_minute(r, *used) for r in PAYG)
    payg_quota_tpm = sum(per_minute(r, "admitted_tokens") for r in PAYG)
    served_tpm = ptu_tpm + payg_tpm
    real = settings["ptu_real_tpm"]
    excess = served_tpm - real
    summary = client_summary(client)
    failures = 1 - summary["ok"] / max(1, summary["sent"])
    calls = {r: whole(r, "requests") for r in (PTU, *PAYG)}
    upstream_429 = {r: whole(r, "throttled") for r in (PTU, *PAYG)}
    ptu_attempts = metrics["selections"].get(PTU, 0.0)
    payg_attempts = sum(metrics["selections"].get(r, 0.0) for r in PAYG)
    throttled = metrics["throttled"]
    timeline = []  # the PTU's learned factor at each simulated minute
    for minute in range(1, int(settings["duration_s"] / sim_minute) + 1):
        t = started + minute * sim_minute
        before = [f for f in factors if f[0] <= t]
        if before:
            timeline.append({"minute": minute, "factor": before[-1][1]})
    return {
        "kind": "ptu", "settings": settings, "steady_minutes": minutes,
        "clients": summary, "client_failures": failures,
        "ptu_tpm": ptu_tpm, "ptu_share": ptu_tpm / real, "ptu_attempts": ptu_attempts,
        "payg_tpm": payg_tpm, "payg_quota_tpm": payg_quota_tpm, "served_tpm": served_tpm,
        "excess_tpm": excess, "payg_over_excess": payg_tpm / excess if excess > 0 else None,
        "per_region_tpm": {r: per_minute(r, *used) for r in (PTU, *PAYG)},
        "upstream_calls": calls, "upstream_429_sim": upstream_429,
        "upstream_429_gateway": throttled, "payg_attempts": payg_attempts,
        "spilled_requests": metrics["spilled_requests"],
        "spilled_tokens": metrics["spilled_tokens"],
        "payg_tokens_whole_run": sum(whole(r, k) for r in PAYG for k in used),
        "payg_requests_whole_run": sum(whole(r, "admitted") for r in PAYG),
        "utilization_gauges": metrics["utilization"],
        "factor_timeline": timeline, "factor_min": min((f[1] for f in factors), default=None),
        "targets": {
            "client_failures": {"value": failures, "target": TARGETS["client_failures"],
                                "met": failures <= TARGETS["client_failures"]},
            "ptu_share": {"value": ptu_tpm / real, "target": TARGETS["ptu_share"],
                          "met": ptu_tpm / real >= TARGETS["ptu_share"]}},
        "logs": logs}


def render(r: dict[str, Any]) -> str:
    s = r["settings"]
    k = lambda x: f"{x / 1000:,.1f}K"  # noqa: E731
    g429 = r["upstream_429_gateway"]
    ptu_429, std_429 = g429.get("provisioned", 0.0), g429.get("standard", 0.0)
    rows = [
        ["client failures (not 200)", report.pct(r["client_failures"], 2),
         f"≤ {report.pct(TARGETS['client_failures'], 1)}",
         f"{r['clients']['sent']:,} sent; statuses {r['clients']['statuses']}"],
        ["client latency p50 / p99", f"{report.ms(r['clients']['p50'])} / "
         f"{report.ms(r['clients']['p99'])}", "", "successes, streams to the last byte"],
        ["PTU delivered / its real TPM", report.pct(r["ptu_share"]),
         f"≥ {report.pct(TARGETS['ptu_share'], 0)}",
         f"{k(r['ptu_tpm'])} of {k(s['ptu_real_tpm'])} TPM (configured "
         f"{k(s['ptu_configured_tpm'])})"],
        ["standard delivered / excess", "n/a" if r["payg_over_excess"] is None
         else f"{r['payg_over_excess']:.2f}", "≤ 1 (+ noise)",
         f"{k(r['payg_tpm'])} vs {k(r['excess_tpm'])} TPM (served {k(r['served_tpm'])} - "
         f"PTU real {k(s['ptu_real_tpm'])}); quota counted {k(r['payg_quota_tpm'])} of "
         f"{k(sum(s['payg_tpm'].values()))}"],
        ["spilled (balancer_spilled_*)", f"{r['spilled_requests']:,.0f} req",
         "= standard's",
         f"{k(r['spilled_tokens'])} tokens; standard regions served "
         f"{r['payg_requests_whole_run']:,.0f} req, {k(r['payg_tokens_whole_run'])} tokens"],
        ["upstream 429s, sku=provisioned", f"{ptu_429:,.0f}", "normal",
         f"{report.pct(ptu_429 / max(1.0, r['ptu_attempts']))} of "
         f"{r['ptu_attempts']:,.0f} PTU attempts"],
        ["upstream 429s, sku=standard", f"{std_429:,.0f}", "",
         f"{report.pct(std_429 / max(1.0, r['payg_attempts']), 2)} of "
         f"{r['payg_attempts']:,.0f} standard attempts"],
        ["PTU learned factor (per sim. min)",
         " ".join(f"{p['factor']:.2f}" for p in r["factor_timeline"]) or "n/a",
         "", f"min {r['factor_min']}; real/configured = "
             f"{s['ptu_real_tpm'] / s['ptu_configured_tpm']:.2f}"],
    ]
    text = report.table(["measure", "value", "target", "detail"], rows, "lrll")
    notes = (f"PTU {PTU}: real {s['ptu_real_tpm']:,} TPM, configured "
             f"{s['ptu_configured_tpm']:,}; standard: "
             + ", ".join(f"{n} {t:,}" for n, t in s["payg_tpm"].items())
             + f" TPM. Demand {s['demand']:g}x the PTU's real TPM ({s['rate_rps']:.1f} req/s "
             f"real; mean {s['mean_used']:,.0f} tokens used, {s['mean_estimated']:,.0f} "
             f"estimated), time x{s['time_scale']:g}, {s['duration_s']:g} s of load, the "
             f"first {s['warmup_s']:g} s excluded from the TPM figures (the 429s, spill and "
             f"failures count the whole run); {s['replicas']} replicas sharing Redis, "
             f"max_attempts {s['max_attempts']}, learned capacity {s['learned_capacity']}.")
    out = f"{text}\n\n{notes}"
    if s["quick"]:
        out += "\n\n**--quick: smoke settings, not a measurement.**"
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt-4")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: a few seconds, one replica, no thresholds")
    p.add_argument("--ptu-tpm", type=int, default=100_000, help="the PTU's real TPM")
    p.add_argument("--ptu-overstated", type=float, default=2.0,
                   help="its configured tpm as a multiple of the real one (2)")
    p.add_argument("--demand", type=float, default=2.5,
                   help="load as a multiple of the PTU's real TPM (2.5)")
    p.add_argument("--time-scale", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=60.0, help="real seconds of load (60)")
    p.add_argument("--warmup", type=float, default=6.0,
                   help="real seconds left out of the TPM figures (6: a simulated minute)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--clients", type=int, default=2, help="load processes (2)")
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--learned-capacity", choices=["on", "off"], default="on",
                   help="off: the gateway trusts the PTU's overstated tpm (on)")
    add_load_arguments(p)
    report.add_output_arguments(p)


def main(argv: list[str] | None = None) -> int:
    args = report.parser("ptu", __doc__, add_arguments).parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.time_scale, args.replicas = 6.0, 1.0, 30.0, 1
    return report.execute("ptu", "## Provisioned throughput first, standard for the excess",
                          run, render, args)


if __name__ == "__main__":
    sys.exit(main())
