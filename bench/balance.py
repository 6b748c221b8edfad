"""Balancing benchmark: how much of the paid-for quota each strategy delivers.

    balancer bench balance             # from the repository root

The simulator serves the reference regions of regions.yaml (their real TPM; the
lowest-priority tier of the model, so the OpenAI fallback is left out). For each
strategy, one after the other on a fresh simulator: three proxy or gateway replicas run
as separate processes, and load-generator processes send an open-loop mix (prompts of
200-3,000 tokens, max_tokens 50-1,000, a fifth of them streamed) at a multiple of the
total capacity. Time is compressed (by default 10x: a simulated minute lasts 6 s).

Strategies, side by side in one run:
  (a) naive:  uniform shuffle, failover on 429 (bench/naive_proxy.py --mode uniform)
  (b) static: static TPM weights per replica, no shared store (--mode static)
  (c) redis:  `balancer serve` replicas sharing a Redis capacity store
  (d) later:  (c) plus later policies (LATER_POLICIES), skipped while none exists

Delivered TPM = the estimated cost (prompt + max_tokens, what Azure's quota counter
charges) of the requests the regions admitted, per simulated minute, over the steady
state (after the first simulated minute), as a share of the total configured TPM.

`--operation responses` sends the same mix (same seed: the same prompts, budgets and
streams) as Responses API calls, POST /v1/responses with `input` and `max_output_tokens`,
which the simulated Azure regions answer as Azure does: remaining-quota headers of -1
and 429s without retry-after. Its record is balance-responses-<time>.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancer import config as config_mod
from balancer.config import ConfigError
from bench import report
from bench.harness import (
    Loads,
    Region,
    Sampler,
    add_load_arguments,
    at,
    bench_config,
    load_mix,
    mean_cost,
    redis_server,
    reference_regions,
    require_redis,
    serve_cmd,
    simulate_cmd,
    start_pool,
    workspace,
)
from bench.loadgen import OPERATIONS as LOAD_OPERATIONS
from bench.loadgen import Mix
from bench.procs import PYTHON, ROOT, Procs

# --operation: how the title and the notes name the requests
OPERATION_TITLES = {"chat": "Chat completions (POST /v1/chat/completions)",
                    "responses": "Responses API (POST /v1/responses)"}


def later_policies_for(time_scale: float) -> dict[str, dict[str, Any]]:
    """(d): policies layered on (c), each as top-level regions.yaml sections. Add one here
    when it exists; while the config does not know a section, that policy is skipped with
    a note, so the slot costs nothing until then."""
    # Waits are real milliseconds: 10 simulated seconds, whatever the time compression.
    wait_ms = round(10_000 / time_scale)
    return {
        "latency-aware weighting": {"latency_weighting": {"enabled": True}},
        f"admission queue (requests wait up to 10 simulated s = {wait_ms} ms)": {
            "admission_queue": {"enabled": True, "default_wait_ms": {
                "chat/completions": wait_ms, "completions": wait_ms, "responses": wait_ms}}},
    }


@dataclass
class Strategy:
    key: str
    label: str
    kind: str  # "proxy" | "gateway"
    mode: str = ""  # naive_proxy --mode
    sections: dict[str, Any] = field(default_factory=dict)  # extra regions.yaml sections


STRATEGIES = {
    "naive": Strategy("naive", "(a) naive proxy: uniform shuffle + failover", "proxy",
                      "uniform"),
    "static": Strategy("static", "(b) static TPM weights, no shared store", "proxy", "static"),
    "redis": Strategy("redis", "(c) balancer, shared Redis capacity", "gateway"),
    "later": Strategy("later", "(d) (c) + later policies", "gateway"),
}


# --------------------------------------------------------------------------- setup


def later_policies(time_scale: float) -> tuple[dict[str, Any], list[str], list[str]]:
    """The sections of the later policies this build's config accepts, their names, and
    notes on the others."""
    accepted: dict[str, Any] = {}
    names, notes = [], []
    for name, sections in later_policies_for(time_scale).items():
        text = bench_config([Region("probe", 1000, 6)], "m", {"time_scale": 1}, sections)
        try:
            config_mod.parse(text, "probe.yaml", {"SIM_URL": "http://x", "STORE_URL": "memory://"})
        except ConfigError as exc:
            notes.append(f"{name}: not available in this build "
                         f"({str(exc).splitlines()[0]}).")
            continue
        accepted.update(sections)
        names.append(name)
    return accepted, names, notes


# --------------------------------------------------------------------------- one strategy


def run_strategy(strategy: Strategy, regions: list[Region], keep: dict[str, Any],
                 args: argparse.Namespace, mix: Mix, rate: float, workdir: Path,
                 progress: report.Progress, redis_port: int | None) -> dict[str, Any]:
    sim_minute = 60.0 / args.time_scale
    duration = args.minutes * sim_minute
    wd = workdir / strategy.key
    gateway = {"time_scale": args.time_scale, **keep}
    config = wd / "regions.yaml"
    wd.mkdir(parents=True, exist_ok=True)
    config.write_text(bench_config(regions, args.model, gateway, strategy.sections))
    store = f"redis://127.0.0.1:{redis_port}/{args.strategies.index(strategy.key)}" \
        if redis_port else "memory://"
    replica = serve_cmd(config) if strategy.kind == "gateway" else [
        PYTHON, "-m", "bench.naive_proxy", "--mode", strategy.mode, "--config", str(config),
        "--port", "{port}"]
    total_tpm = sum(r.tpm for r in regions)
    with Procs(wd) as procs:
        sim, replicas = start_pool(procs, store, args.log_level,
                                   simulate_cmd(config, args.time_scale, args.seed), replica,
                                   args.replicas)
        sampler = Sampler(sim, args.model, args.sample_interval)
        sampler.take()
        loads = Loads(procs, mix, args.seed * 100)
        started = time.monotonic()
        for _ in range(args.clients):
            loads.spawn("client", replicas, rate / args.clients, duration)
        with sampler:
            loads.wait(started, duration, progress,
                       lambda elapsed: _live(strategy, sampler, elapsed, duration, total_tpm,
                                             args.time_scale), slack=150, tick=0.5)
        sampler.take()
        client = loads.merged()
    return analyse(strategy, regions, sampler.samples, client, started, args)


def _live(strategy: Strategy, sampler: Sampler, elapsed: float, duration: float,
          total_tpm: int, time_scale: float) -> str:
    text = report.running("balance", f"{strategy.label:45.45s}", elapsed, duration)
    samples = sampler.samples
    if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
        (t0, a), (t1, b) = samples[0], samples[-1]
        admitted = sum(b[r]["admitted_tokens"] - a[r]["admitted_tokens"] for r in b)
        calls = sum(b[r]["requests"] - a[r]["requests"] for r in b)
        throttled = sum(b[r]["throttled"] - a[r]["throttled"] for r in b)
        tpm = admitted / ((t1 - t0) * time_scale / 60)
        text += f"  delivered {tpm / total_tpm:6.1%}  upstream 429s " \
                f"{throttled / max(calls, 1):6.1%}"
    return text


# --------------------------------------------------------------------------- analysis


def analyse(strategy: Strategy, regions: list[Region],
            samples: list[tuple[float, dict[str, dict[str, int]]]], client: dict[str, Any],
            started: float, args: argparse.Namespace) -> dict[str, Any]:
    sim_minute = 60.0 / args.time_scale
    warm_end = started + args.warmup_minutes * sim_minute
    load_end = started + args.minutes * sim_minute
    steady_minutes = args.minutes - args.warmup_minutes
    total_tpm = sum(r.tpm for r in regions)

    def delta(key: str, region: str, t0: float, t1: float) -> float:
        return at(samples, t1, region, key) - at(samples, t0, region, key)

    per_region = {}
    for r in regions:
        admitted = delta("admitted_tokens", r.name, warm_end, load_end)
        used = (delta("prompt_tokens", r.name, warm_end, load_end)
                + delta("completion_tokens", r.name, warm_end, load_end))
        final = samples[-1][1][r.name]
        per_region[r.name] = {
            "tpm": r.tpm, "utilisation": admitted / (r.tpm * steady_minutes),
            "admitted_tpm": admitted / steady_minutes, "used_tpm": used / steady_minutes,
            "calls": final["requests"], "throttled": final["throttled"],
            "peak_window_tokens": final["peak_window_tokens"]}
    admitted_tpm = sum(v["admitted_tpm"] for v in per_region.values())
    for r in regions:  # the split of the admitted tokens, against the split of the TPM
        v = per_region[r.name]
        v["share"] = v["admitted_tpm"] / admitted_tpm if admitted_tpm else 0.0
        v["tpm_share"] = r.tpm / total_tpm
    whole_admitted = sum(delta("admitted_tokens", r.name, started, load_end) for r in regions)
    calls = sum(v["calls"] for v in per_region.values())
    throttled = sum(v["throttled"] for v in per_region.values())
    statuses = client["statuses"]
    sent = max(1, client["sent"])
    ok = statuses.get("200", 0)
    rejected = statuses.get("429", 0)
    errors = sum(n for s, n in statuses.items() if s not in ("200", "429"))
    latencies = client["latencies"]
    return {
        "key": strategy.key, "label": strategy.label, "sections": strategy.sections,
        "delivered_tpm": admitted_tpm, "delivered": admitted_tpm / total_tpm,
        # half the sum of |share - TPM share|: the part of the traffic off the TPM split
        "split_error": sum(abs(v["share"] - v["tpm_share"]) for v in per_region.values()) / 2,
        "delivered_whole_run": whole_admitted / (total_tpm * args.minutes),
        "used_tpm": sum(v["used_tpm"] for v in per_region.values()),
        "upstream_calls": calls, "upstream_429": throttled,
        "upstream_429_rate": throttled / max(calls, 1),
        "calls_per_request": calls / sent,
        "client": {"sent": client["sent"], "statuses": statuses, "ok": ok,
                   "rejected_429": rejected / sent, "errors": errors / sent,
                   "error_samples": client["errors"][:5],
                   "p50": report.percentile(latencies, 50),
                   "p99": report.percentile(latencies, 99),
                   "tokens": client["tokens"]},
        "regions": per_region,
        "timeline": timeline(samples, regions, started, args),
    }


def timeline(samples: list[tuple[float, dict[str, dict[str, int]]]], regions: list[Region],
             started: float, args: argparse.Namespace) -> dict[str, Any]:
    """Per-region utilisation over time: admitted tokens over a trailing half simulated
    minute, as a share of the region's TPM; x in simulated minutes."""
    sim_minute = 60.0 / args.time_scale
    window = 0.5 * sim_minute
    out: dict[str, Any] = {"minutes": [], "regions": {r.name: [] for r in regions}}
    t = started + window
    end = started + args.minutes * sim_minute
    step = max(args.sample_interval, sim_minute / 24)
    while t <= end + 1e-9:
        out["minutes"].append(round((t - started) / sim_minute, 3))
        for r in regions:
            tokens = at(samples, t, r.name, "admitted_tokens") - \
                at(samples, t - window, r.name, "admitted_tokens")
            out["regions"][r.name].append(round(tokens / (r.tpm * 0.5), 4))
        t += step
    return out


# --------------------------------------------------------------------------- output


def title(record: dict[str, Any]) -> str:
    operation = record.get("operation", "chat")
    return "## Balancing" + ("" if operation == "chat" else f": {OPERATION_TITLES[operation]}")


def render(record: dict[str, Any]) -> str:
    s = record["settings"]
    operation = record.get("operation", "chat")
    results = record["strategies"]
    rows = []
    for res in results:
        c = res["client"]
        rows.append([res["label"], f"{res['delivered_tpm'] / 1000:,.0f}K",
                     report.pct(res["delivered"]), f"{res['used_tpm'] / 1000:,.0f}K",
                     report.pct(res["upstream_429_rate"], 2), f"{res['calls_per_request']:.2f}",
                     report.pct(c["rejected_429"]), report.pct(c["errors"], 2),
                     report.ms(c["p50"]), report.ms(c["p99"])])
    out = [report.table(
        ["strategy", "delivered TPM", "% of total", "used TPM", "upstream 429s",
         "calls/request", "client 429s", "client errors", "p50", "p99"], rows)]
    region_rows = []
    for name, tpm in record["regions"].items():
        region_rows.append([name, f"{tpm // 1000}K"] + [
            report.pct(res["regions"][name]["utilisation"], 0) for res in results])
    out.append("Per-region utilisation (admitted estimated tokens / the region's TPM, "
               "steady state):\n\n" + report.table(
                   ["region", "TPM"] + [res["label"][:3] for res in results], region_rows))
    split_rows = []
    for name, tpm in record["regions"].items():
        split_rows.append([name, report.pct(tpm / record["total_tpm"])] + [
            report.pct(res["regions"][name].get("share"), 1) for res in results])
    split_rows.append(["off the TPM split", ""] + [
        report.pct(res.get("split_error"), 1) for res in results])
    out.append("Split of the admitted estimated tokens across regions, against the split of "
               "the TPM (steady state):\n\n" + report.table(
                   ["region", "TPM share"] + [res["label"][:3] for res in results], split_rows))
    target = record.get("targets")
    if target:
        out.append("Targets for (c):\n\n" + report.table(
            ["target", "measured", "goal", "met"],
            [["delivered TPM, % of total", report.pct(target["delivered"]["value"]), "≥ 97%",
              "yes" if target["delivered"]["met"] else "NO"],
             ["upstream 429s, % of upstream calls",
              report.pct(target["upstream_429"]["value"], 2), "≤ 0.5%",
              "yes" if target["upstream_429"]["met"] else "NO"]], "lrrl"))
    out.append(
        f"Total capacity {record['total_tpm']:,} TPM over {len(record['regions'])} regions "
        f"(regions.yaml; DESIGN.md's table says 480K, but its rows add up to 520K). Demand "
        f"{s['demand']:g}x = {s['demand'] * record['total_tpm']:,.0f} TPM of estimated cost "
        f"({s['rate']:.1f} req/s, mean cost {s['mean_cost']:,.0f} tokens); "
        f"{s['replicas']} replicas, {s['clients']} load processes; time x{s['time_scale']:g} "
        f"(a simulated minute = {60 / s['time_scale']:g} s); {s['minutes']:g} simulated "
        f"minutes per strategy, the first {s['warmup_minutes']:g} excluded as warm-up. "
        f"Requests: {OPERATION_TITLES[operation]}. "
        "Latency: successful requests, as clients saw them (streams: until the last byte).")
    out += record["notes"]
    return "\n\n".join(out)


def plot(record: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    results = record["strategies"]
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.2 * len(results)), sharex=True,
                             squeeze=False)
    colors = plt.get_cmap("tab10")
    warm = record["settings"]["warmup_minutes"]
    for ax, res in zip(axes[:, 0], results, strict=True):
        tl = res["timeline"]
        for i, (name, values) in enumerate(tl["regions"].items()):
            tpm = record["regions"][name]
            ax.plot(tl["minutes"], [100 * v for v in values], color=colors(i), linewidth=1.4,
                    label=f"{name} ({tpm // 1000}K)")
        ax.axhline(100, color="black", linestyle="--", linewidth=0.8)
        ax.axvspan(0, warm, color="grey", alpha=0.12, linewidth=0)
        ax.set_ylim(0, 160)
        ax.set_ylabel("utilisation %")
        ax.set_title(f"{res['label']}: delivered {res['delivered']:.1%} of "
                     f"{record['total_tpm'] // 1000}K TPM, upstream 429s "
                     f"{res['upstream_429_rate']:.2%}", fontsize=10, loc="left")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(ncol=4, fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("simulated minutes (shaded: warm-up, excluded)")
    what = "" if record.get("operation", "chat") == "chat" else \
        f", {OPERATION_TITLES[record['operation']]}"
    fig.suptitle("Per-region utilisation over time (admitted estimated tokens per half "
                 f"simulated minute / TPM){what}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    regions, keep = reference_regions(args.config, args.model)
    if args.max_attempts:
        keep["max_attempts"] = args.max_attempts
    total_tpm = sum(r.tpm for r in regions)
    mix = load_mix(args, args.operation)
    mc = mean_cost(mix)
    rate = args.demand * total_tpm * args.time_scale / 60 / mc
    notes: list[str] = []
    strategies = []
    for key in args.strategies:
        strategy = STRATEGIES[key]
        if key == "later":
            sections, names, later_notes = later_policies(args.time_scale)
            notes += [f"(d) {n}" for n in later_notes]
            if not sections:
                notes.append("(d) skipped: none of the later policies (latency-aware "
                             "weighting, admission queue) exists in this build yet.")
                continue
            notes.append(f"(d) = (c) + {' + '.join(names)}.")
            strategy = Strategy(strategy.key, strategy.label, strategy.kind,
                                sections=sections)
        strategies.append(strategy)
    need_redis = any(s.kind == "gateway" for s in strategies)
    if need_redis:
        require_redis(" for (c)")
    workdir, progress = workspace("balance")
    results = []
    with redis_server(workdir) if need_redis else nullcontext(None) as redis_port:
        for strategy in strategies:
            res = run_strategy(strategy, regions, keep, args, mix, rate, workdir, progress,
                               redis_port if strategy.kind == "gateway" else None)
            progress.done(f"{strategy.label}: delivered {res['delivered']:.1%}, upstream "
                          f"429s {res['upstream_429_rate']:.2%}, client 429s "
                          f"{res['client']['rejected_429']:.1%}")
            results.append(res)
    record: dict[str, Any] = {
        "kind": "balance", "operation": mix.operation, "machine": report.machine(),
        "settings": {"config": args.config, "model": args.model, "operation": mix.operation,
                     "demand": args.demand,
                     "time_scale": args.time_scale, "minutes": args.minutes,
                     "warmup_minutes": args.warmup_minutes, "replicas": args.replicas,
                     "clients": args.clients, "rate": rate, "mean_cost": mc,
                     "prompt_tokens": mix.prompt_tokens, "max_tokens": mix.max_tokens,
                     "stream_fraction": mix.stream_fraction, "max_attempts":
                     keep["max_attempts"], "seed": args.seed},
        "total_tpm": total_tpm, "regions": {r.name: r.tpm for r in regions},
        "strategies": results, "notes": notes, "logs": str(workdir)}
    redis_result = next((r for r in results if r["key"] == "redis"), None)
    if redis_result is not None:
        record["targets"] = {
            "delivered": {"value": redis_result["delivered"], "target": 0.97,
                          "met": redis_result["delivered"] >= 0.97},
            "upstream_429": {"value": redis_result["upstream_429_rate"], "target": 0.005,
                             "met": redis_result["upstream_429_rate"] <= 0.005}}
    return record


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(ROOT / "regions.yaml"),
                   help="the regions and TPM to simulate (default: the repository's "
                        "regions.yaml)")
    p.add_argument("--model", default="gpt-4")
    p.add_argument("--operation", choices=list(LOAD_OPERATIONS), default="chat",
                   help="the requests: chat (/v1/chat/completions) or responses "
                        "(/v1/responses, the Responses API) (chat)")
    p.add_argument("--demand", type=float, default=1.25,
                   help="offered load as a multiple of total TPM (1.25)")
    p.add_argument("--time-scale", type=float, default=10.0,
                   help="time compression: 10 = a simulated minute lasts 6 s (10)")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="simulated minutes per strategy, warm-up included (5)")
    p.add_argument("--warmup-minutes", type=float, default=1.0,
                   help="simulated minutes excluded from the steady state (1)")
    p.add_argument("--strategies", default="naive,static,redis,later",
                   type=report.comma_list,
                   help="comma-separated subset of naive,static,redis,later")
    p.add_argument("--replicas", type=int, default=3, help="proxy/gateway processes (3)")
    p.add_argument("--clients", type=int, default=3, help="load-generator processes (3)")
    p.add_argument("--max-attempts", type=int, help="override gateway.max_attempts")
    add_load_arguments(p)
    report.add_output_arguments(p, "the JSON record and the PNG")


def main(argv: list[str] | None = None) -> int:
    args = report.parser("balance", __doc__, add_arguments).parse_args(argv)
    report.check_known("strategies", args.strategies, STRATEGIES)
    if args.warmup_minutes >= args.minutes:
        raise SystemExit("--warmup-minutes must be less than --minutes")
    record, when = report.timed(run, args)
    print(title(record) + "\n\n" + render(record) + "\n")
    if not args.no_write:
        # Chat keeps its file names (balance-latest.json, latest.png: BENCHMARKS.md's);
        # another operation writes beside them, balance-<operation>-*.
        kind = "balance" if args.operation == "chat" else f"balance-{args.operation}"
        png = plot(record, args.out_dir / f"{kind}-{when}.png")
        if png is None:
            print("PNG: skipped (matplotlib is not installed: pip install -e '.[bench]')")
        elif args.operation == "chat":
            latest = args.out_dir / "latest.png"
            shutil.copyfile(png, latest)
            record["png"] = str(png)
            print(f"PNG: {png} (and {latest})")
        else:
            record["png"] = str(png)
            print(f"PNG: {png}")
        path = report.write_json(kind, record, args.out_dir, when)
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

