"""Overhead benchmark: what the gateway costs per request, side by side in one run.

    balancer bench overhead            # from the repository root

Every path is a separate process in front of the same simulated upstream with zero
added latency (one region with an unlimited quota, so nothing is throttled):

- direct:          the load generator talks to the simulator itself
- passthrough:     bench/passthrough.py, a bare aiohttp proxy (the physical-limit baseline)
- gateway-memory:  `balancer serve`, in-process capacity store
- gateway-redis:   `balancer serve`, shared Redis store (a redis-server started here)
- gateway-redis-2w: the same with `--workers 2`: two processes on one port (SO_REUSEPORT)
                   sharing the Redis store (BENCHMARKS.md 2 (c): on a 2-core machine
                   they share the cores with the load generator and the simulator)
- gateway-redis-quiet: the same at log level WARNING, without the access log (for
                   information: the targets use gateway-redis, as shipped)
- gateway-redis-asyncio: gateway-redis on asyncio's own event loop
                   (BALANCER_EVENT_LOOP=asyncio): the uvloop lever off, side by side
- passthrough-uvloop: the pass-through on uvloop, the gateway's default loop (for
                   information: the targets compare with the plain pass-through, as the
                   issue defines them; this row shows the like-for-like ratio)
- litellm:         LiteLLM's proxy on the same upstream, with `--peers litellm` only
                   (bench/peers.py installs it in a virtual environment of its own)

Each path is measured at concurrency 1 (serial latency) and 32 (throughput) with
`wrk` (closed loop, keep-alive), or with several Python processes when wrk is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import costs as costs_mod
from bench import peers as peers_mod
from bench import report
from bench.harness import API_VERSION, SIM_KEY, workspace
from bench.procs import PYTHON, Procs

UPSTREAM_PATH = f"/bench/openai/deployments/gpt-4/chat/completions?api-version={API_VERSION}"
CLIENT_PATH = "/v1/chat/completions"
BODY = json.dumps({
    "model": "gpt-4",
    "messages": [
        {"role": "system", "content": "You are a concise assistant for a benchmark."},
        {"role": "user", "content": "Summarise in one sentence why a gateway must add little "
                                    "latency and spend little CPU per request."},
    ],
    "max_tokens": 16,
}, separators=(",", ":"))

# One region with a quota nobody can exhaust: the benchmark measures the path, not 429s.
CONFIG = f"""
store: {{url: "${{STORE_URL}}"}}
gateway: {{max_attempts: 3}}
regions:
  - name: bench
    kind: azure
    endpoint: ${{SIM_URL}}/bench
    api_key: {SIM_KEY}
    api_version: "{API_VERSION}"
    deployments:
      gpt-4: {{deployment: gpt-4, tpm: 1000000000, rpm: 1000000000}}
"""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


# --------------------------------------------------------------------------- load


def wrk_version() -> str | None:
    binary = shutil.which("wrk")
    if binary is None:
        return None
    out = subprocess.run([binary, "-v"], capture_output=True, text=True)
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "wrk"


def measure_wrk(url: str, headers: dict[str, str], concurrency: int, duration: float,
                workdir: Path) -> dict[str, Any]:
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in
                      {"Content-Type": "application/json", **headers}.items())
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT.format(body=BODY, headers=lines))
    threads = 1 if concurrency < 8 else 2
    seconds = max(1, math.ceil(duration))  # wrk takes whole seconds
    cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s",
           "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[8:])
            seconds = raw["duration_us"] / 1e6
            errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
            return {"rps": raw["requests"] / seconds, "requests": raw["requests"],
                    "p50": raw["p50_us"] / 1e6, "p99": raw["p99_us"] / 1e6, "errors": errors}
    raise RuntimeError(f"wrk printed no result: {out.stdout}\n{out.stderr}")


def measure_python(url: str, headers: dict[str, str], concurrency: int, duration: float,
                   workdir: Path, processes: int) -> dict[str, Any]:
    body_file = workdir / "body.json"
    body_file.write_text(BODY)
    n = max(1, min(processes, concurrency))
    shares = [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]
    procs = []
    for i, share in enumerate(shares):
        out = workdir / f"closedloop-{i}.json"
        args = [PYTHON, "-m", "bench.closedloop", "--url", url, "--body-file", str(body_file),
                "--concurrency", str(share), "--duration", f"{duration:g}", "--out", str(out)]
        args += [a for k, v in headers.items() for a in ("--header", f"{k}={v}")]
        procs.append((subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1]), out))
    results = []
    for proc, out in procs:
        try:
            proc.wait(duration + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
        results.append(json.loads(out.read_text()))
    latencies = [x for r in results for x in r["latencies"]]
    seconds = max(r["seconds"] for r in results)
    errors = sum(r["errors"]["status"] + r["errors"]["connect"] for r in results)
    return {"rps": len(latencies) / seconds, "requests": len(latencies),
            "p50": report.percentile(latencies, 50), "p99": report.percentile(latencies, 99),
            "errors": errors}


# --------------------------------------------------------------------------- paths


def start_paths(procs: Procs, workdir: Path, log_level: str, peers: list[str],
                peer_info: dict[str, Any] | None = None
                ) -> tuple[dict[str, tuple[str, dict[str, str]]], list[str]]:
    """Start every path; returns name -> (URL to load, headers) and notes (`peer_info`
    gets each peer's version and install time)."""
    notes: list[str] = []
    config = workdir / "regions.yaml"
    config.write_text(CONFIG)
    sim = procs.server("simulator", [
        PYTHON, "-m", "balancer.cli", "simulate", "--config", str(config), "--port", "{port}",
        "--latency-base-ms", "0", "--latency-per-token-ms", "0", "--seed", "1"],
        "/_sim/stats", env={"SIM_URL": "http://127.0.0.1:1", "STORE_URL": "memory://"})
    upstream = sim + UPSTREAM_PATH
    paths: dict[str, tuple[str, dict[str, str]]] = {"direct": (upstream, {"api-key": SIM_KEY})}
    pt = procs.server("passthrough", [
        PYTHON, "-m", "bench.passthrough", "--port", "{port}", "--upstream", upstream,
        "--header", f"api-key={SIM_KEY}"], "/healthz")
    paths["passthrough"] = (pt + CLIENT_PATH, {})
    pt_uv = procs.server("passthrough-uvloop", [
        PYTHON, "-m", "bench.passthrough", "--port", "{port}", "--upstream", upstream,
        "--header", f"api-key={SIM_KEY}", "--loop", "uvloop"], "/healthz")
    paths["passthrough-uvloop"] = (pt_uv + CLIENT_PATH, {})
    redis_port = procs.redis()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    for name, store, level, workers, loop in (
            ("gateway-memory", "memory://", log_level, 1, "auto"),
            ("gateway-redis", redis_url, log_level, 1, "auto"),
            ("gateway-redis-2w", redis_url, log_level, 2, "auto"),
            ("gateway-redis-quiet", redis_url, "WARNING", 1, "auto"),
            ("gateway-redis-asyncio", redis_url, log_level, 1, "asyncio")):
        env = {"SIM_URL": sim, "STORE_URL": store, "BALANCER_LOG_LEVEL": level,
               "BALANCER_EVENT_LOOP": loop}
        url = procs.server(name, [PYTHON, "-m", "balancer.cli", "serve", "--config", str(config),
                                  "--host", "127.0.0.1", "--port", "{port}",
                                  "--workers", str(workers)], "/healthz", env)
        paths[name] = (url + CLIENT_PATH, {})
    if "litellm" not in peers:
        notes.append("litellm: skipped (add `--peers litellm` for its row: installs "
                     f"litellm[proxy]=={peers_mod.LITELLM_VERSION} once in bench/.peers/).")
    else:
        paths.update(start_litellm(procs, workdir, sim, notes,
                                   {} if peer_info is None else peer_info))
    return paths, notes


def start_litellm(procs: Procs, workdir: Path, sim: str, notes: list[str],
                  info: dict[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """The litellm path, installed first if needed; none, with a note, when installing or
    starting it fails."""
    started = time.monotonic()
    try:
        peer = peers_mod.ensure_litellm(workdir / "litellm-install.log")
    except (RuntimeError, OSError) as exc:
        notes.append(f"litellm: skipped: could not install it ({exc}); log in "
                     f"{workdir / 'litellm-install.log'}.")
        return {}
    info["litellm"] = {"version": peer.version, "install_seconds": peer.install_seconds}
    try:
        url, headers = peers_mod.start_litellm(procs, workdir, sim, peer.binary)
        check_path("litellm", url + CLIENT_PATH, headers)
    except (RuntimeError, OSError, ValueError) as exc:
        notes.append(f"litellm: skipped: its proxy did not start or answer ({str(exc)[:300]}).")
        return {}
    info["litellm"]["ready_seconds"] = round(time.monotonic() - started, 1)
    how = ("reused" if peer.install_seconds is None
           else f"installed in {peer.install_seconds:.0f} s")
    notes.append(f"litellm {peer.version} ({how}, bench/.peers/litellm): its proxy, 1 worker, "
                 "no database, no callbacks, on the same simulator (Azure route).")
    return {"litellm": (url + CLIENT_PATH, headers)}


def check_path(name: str, url: str, headers: dict[str, str]) -> None:
    """One request must succeed with usage, or the numbers would mean nothing."""
    import urllib.request

    req = urllib.request.Request(url, data=BODY.encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=10) as r:
        payload = json.loads(r.read())
    if "usage" not in payload:
        raise RuntimeError(f"{name}: no usage in {payload}")


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    loadgen = args.loadgen
    version = wrk_version()
    if loadgen == "auto":
        loadgen = "wrk" if version else "python"
    if loadgen == "wrk" and version is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk); "
                         "use --loadgen python")
    notes: list[str] = []
    if loadgen == "python":
        notes.append("load generator: Python closed loop in several processes (wrk not "
                     "found): its ceiling is the direct row; paths near it are limited by it.")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    workdir, progress = workspace("overhead")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with Procs(workdir) as procs:
        peer_info: dict[str, Any] = {}
        paths, path_notes = start_paths(procs, workdir, args.gateway_log_level,
                                        [] if args.no_litellm else args.peers, peer_info)
        notes += path_notes
        for name, (url, headers) in paths.items():
            check_path(name, url, headers)
        steps = args.rounds * len(concurrencies) * len(paths)
        step = 0
        for rnd in range(args.rounds):
            for c in concurrencies:
                for name, (url, headers) in paths.items():
                    step += 1
                    progress.update(f"overhead {report.bar(step / steps)} round {rnd + 1}/"
                                    f"{args.rounds} c={c} {name}", force=True)

                    def once(seconds: float, url: str = url, headers: dict[str, str] = headers,
                             c: int = c) -> dict[str, Any]:
                        if loadgen == "wrk":
                            return measure_wrk(url, headers, c, seconds, workdir)
                        return measure_python(url, headers, c, seconds, workdir,
                                              args.processes)

                    if args.warmup > 0:
                        once(args.warmup)
                    results.setdefault(name, {}).setdefault(str(c), []).append(
                        once(args.duration))
        progress.done(f"overhead: {steps} measurements done")
        costs = measure_costs(procs, workdir, paths, loadgen, max(concurrencies), args)
    record = summarize(results, concurrencies, loadgen, version, notes, args, workdir)
    record["costs"] = costs
    record["peers"] = compare_peers(record, peer_info)
    return record


def measure_costs(procs: Procs, workdir: Path, paths: dict[str, tuple[str, dict[str, str]]],
                  loadgen: str, c: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Costs per request of gateway-redis on plain TCP and on TLS (bench/costs.py)."""
    if args.costs_rounds <= 0:
        return None

    def load(url: str, seconds: float) -> dict[str, Any]:
        if loadgen == "wrk":
            return measure_wrk(url, {}, c, seconds, workdir)
        return measure_python(url, {}, c, seconds, workdir, args.processes)

    sim = paths["direct"][0].removesuffix(UPSTREAM_PATH)
    return costs_mod.measure(procs, workdir, sim, CONFIG, CLIENT_PATH, load, args.duration,
                             args.warmup, args.costs_rounds)


LITELLM_TARGET = 40.0  # gateway-redis req/s / litellm's at the highest concurrency


def compare_peers(record: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """Per peer: its version, install time, and our gateways' requests per second over its,
    per concurrency ("gateway vs litellm")."""
    out: dict[str, Any] = {}
    for peer, meta in info.items():
        rows = record["paths"].get(peer)
        if rows is None:
            continue
        ratios = {gw: {c: record["paths"][gw][c]["rps"] / row["rps"] if row["rps"] else None
                       for c, row in rows.items()}
                  for gw in ("gateway-memory", "gateway-redis")}
        out[peer] = {**meta, "ratios": ratios}
    if "litellm" in out:
        hi = str(max(record["settings"]["concurrency"]))
        value = out["litellm"]["ratios"]["gateway-redis"][hi]
        out["litellm"]["target"] = {
            "what": f"gateway-redis req/s / litellm req/s at concurrency {hi}",
            "value": value, "target": LITELLM_TARGET,
            "met": value is not None and value >= LITELLM_TARGET}
    return out


def render_peers(record: dict[str, Any]) -> list[str]:
    """The gateways next to each peer: requests per second, latency and the ratio."""
    out = []
    cs = [str(c) for c in record["settings"]["concurrency"]]
    lo, hi = cs[0], cs[-1]
    for peer, meta in record.get("peers", {}).items():
        paths = record["paths"]
        rows = []
        for name in (peer, "gateway-memory", "gateway-redis"):
            ratio = ["—" if name == peer else _times(meta["ratios"][name][c]) for c in cs]
            rows.append([name, *(f"{paths[name][c]['rps']:,.0f}" for c in cs),
                         _us(paths[name][lo]["p50"]), _us(paths[name][hi]["p50"]),
                         _us(paths[name][hi]["p99"]), *ratio])
        t = meta["target"]
        out.append(f"Gateway vs {peer} {meta['version']} (our req/s / {peer}'s):\n\n" +
                   report.table(["path", *(f"req/s c={c}" for c in cs), f"p50 c={lo}",
                                 f"p50 c={hi}", f"p99 c={hi}",
                                 *(f"vs {peer} c={c}" for c in cs)], rows) +
                   f"\n\nTarget: {t['what']} ≥ {t['target']:.0f}x: "
                   f"{_times(t['value'])} ({'met' if t['met'] else 'NOT met'}).")
    return out


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:,.1f}x"


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]], concurrencies: list[int],
              loadgen: str, version: str | None, notes: list[str], args: argparse.Namespace,
              workdir: Path) -> dict[str, Any]:
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for name, per_c in results.items():
        for c, runs in per_c.items():
            summary.setdefault(name, {})[c] = {
                "rps": _median(runs, "rps"), "p50": _median(runs, "p50"),
                "p99": _median(runs, "p99"), "errors": sum(r["errors"] for r in runs),
                "requests": sum(r["requests"] for r in runs), "runs": runs}
    for per_c in summary.values():
        for c, row in per_c.items():
            direct, base = summary["direct"][c], summary["passthrough"][c]
            row["added_p50"] = row["p50"] - direct["p50"]
            row["added_p99"] = row["p99"] - direct["p99"]
            row["vs_passthrough_rps"] = row["rps"] / base["rps"] if base["rps"] else None
    hi, lo = str(max(concurrencies)), str(min(concurrencies))
    gw, base = summary["gateway-redis"], summary["passthrough"]
    rps_ratio = gw[hi]["rps"] / base[hi]["rps"]
    added = gw[lo]["p50"] - base[lo]["p50"]
    targets = {
        "rps_ratio": {"value": rps_ratio, "target": 0.80, "met": rps_ratio >= 0.80,
                      "what": f"gateway-redis RPS / passthrough RPS at concurrency {hi}"},
        "added_serial_p50": {"value": added, "target": 0.001, "met": added <= 0.001,
                             "what": f"gateway-redis p50 - passthrough p50 at concurrency {lo}"},
    }
    # For information: the same ratio with both on uvloop, and the uvloop lever on/off.
    info = {}
    if "passthrough-uvloop" in summary:
        info["rps_ratio_same_loop"] = gw[hi]["rps"] / summary["passthrough-uvloop"][hi]["rps"]
    if "gateway-redis-asyncio" in summary:
        info["uvloop_rps_gain"] = gw[hi]["rps"] / summary["gateway-redis-asyncio"][hi]["rps"]
    return {"kind": "overhead", "machine": report.machine(), "loadgen": loadgen,
            "wrk": version, "settings": {"duration": args.duration, "warmup": args.warmup,
                                         "rounds": args.rounds, "concurrency": concurrencies,
                                         "gateway_log_level": args.gateway_log_level,
                                         "body_bytes": len(BODY)},
            "paths": summary, "targets": targets, "info": info, "notes": notes,
            "logs": str(workdir)}


def render(record: dict[str, Any]) -> str:
    out = []
    concurrencies = record["settings"]["concurrency"]
    for c in concurrencies:
        rows = []
        for name, per_c in record["paths"].items():
            row = per_c[str(c)]
            rows.append([name, f"{row['rps']:,.0f}", _us(row["p50"]), _us(row["p99"]),
                         "—" if name == "direct" else _us(row["added_p50"], sign=True),
                         "—" if name == "direct" else _us(row["added_p99"], sign=True),
                         report.pct(row["vs_passthrough_rps"], 0), str(row["errors"])])
        out.append(f"Concurrency {c}:\n\n" + report.table(
            ["path", "req/s", "p50", "p99", "p50 added over direct", "p99 added over direct",
             "RPS vs pass-through", "errors"], rows))
    t = record["targets"]
    out.append("Targets (gateway with the Redis store):\n\n" + report.table(
        ["target", "measured", "goal", "met"],
        [[t["rps_ratio"]["what"], report.pct(t["rps_ratio"]["value"], 0), "≥ 80%",
          "yes" if t["rps_ratio"]["met"] else "NO"],
         [t["added_serial_p50"]["what"], _us(t["added_serial_p50"]["value"], sign=True),
          "≤ +1,000 µs", "yes" if t["added_serial_p50"]["met"] else "NO"]], "lrrl"))
    info = record.get("info", {})
    if info:
        parts = []
        if "rps_ratio_same_loop" in info:
            parts.append("gateway-redis / passthrough-uvloop (both on uvloop) "
                         f"{report.pct(info['rps_ratio_same_loop'], 0)}")
        if "uvloop_rps_gain" in info:
            parts.append("gateway-redis (uvloop) / gateway-redis-asyncio "
                         f"{info['uvloop_rps_gain']:.2f}x")
        out.append(f"For information, concurrency {max(concurrencies)}: " + "; ".join(parts)
                   + ".")
    direct = record["paths"]["direct"][str(max(concurrencies))]["rps"]
    lg = record["wrk"] if record["loadgen"] == "wrk" else "Python closed loop"
    out.append(f"Load generator: {lg}; its ceiling (direct, concurrency {max(concurrencies)}): "
               f"{direct:,.0f} req/s. Machine: {record['machine']['cores']} cores.")
    out += render_peers(record)
    if record.get("costs"):
        out.append(costs_mod.render(record["costs"], max(concurrencies)))
    out += record["notes"]
    return "\n\n".join(out)


def _us(seconds: float | None, *, sign: bool = False) -> str:
    if seconds is None or math.isnan(seconds):
        return "n/a"
    us = seconds * 1e6
    return f"{us:+,.0f} µs" if sign else f"{us:,.0f} µs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each (1)")
    p.add_argument("--rounds", type=int, default=2,
                   help="repeat the whole matrix, interleaved; medians are reported (2)")
    p.add_argument("--concurrency", default="1,32", help="comma-separated (1,32)")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto",
                   help="auto: wrk when installed, else Python processes")
    p.add_argument("--processes", type=int, default=2,
                   help="Python load processes when wrk is missing (2)")
    p.add_argument("--gateway-log-level", default="INFO",
                   help="the gateways' log level (INFO, the default, writes access logs)")
    p.add_argument("--peers", type=report.comma_list, default=[],
                   help="peer gateways to add rows for: litellm (installs litellm[proxy]=="
                        f"{peers_mod.LITELLM_VERSION} once in bench/.peers/litellm; default: "
                        "none)")
    p.add_argument("--no-litellm", action="store_true",
                   help="skip the litellm row even with --peers litellm")
    p.add_argument("--costs-rounds", type=int, default=2,
                   help="interleaved rounds of the costs per request table, gateway-redis on "
                        "plain TCP and TLS (2; 0 skips it)")
    report.add_output_arguments(p)


def main(argv: list[str] | None = None) -> int:
    args = report.parser("overhead", __doc__, add_arguments).parse_args(argv)
    report.check_known("peers", args.peers, peers_mod.PEERS)
    return report.execute("overhead", "## Overhead", run, render, args, total=False)


if __name__ == "__main__":
    sys.exit(main())

