"""Costs per request of the gateway with the Redis store, on plain TCP and on TLS
(issue 16): part of `balancer bench overhead`.

For each transport a redis-server and a `balancer serve` of their own, loaded in turn
(interleaved rounds) at the overhead run's highest concurrency; over each measurement:

- store round trips per request: `balancer_store_round_trips_total` (all ops, the
  background heartbeat included) from the gateway's /metrics, delta / requests;
- Redis CPU per 1,000 requests: the `usec` of the script calls in `INFO commandstats`
  (EVALSHA and EVAL: the commands a script runs are counted again on their own rows,
  so those rows are not added), delta, and the redis-server process's own CPU (`INFO
  cpu`, user + sys: command execution plus sockets, and the TLS records on TLS);
- gateway CPU per request: user + system time of the gateway process from
  /proc/<pid>/stat, delta / requests;
- store degradations: "degraded mode" lines in the gateway's log over the whole run (a
  store call past its deadline: the replica served from local buckets for a while, so
  fewer round trips than requests).
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.procs import PYTHON, Procs, get_text

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SCRIPTS = ("evalsha", "eval", "evalsha_ro", "eval_ro")
Load = Callable[[str, float], dict[str, Any]]  # (URL, seconds) -> a result with "requests"


def tls_files(directory: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 (the openssl commands of
    tests/store/conftest.py `make_tls_files`)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is required for the TLS rows")
    directory.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True,
                       timeout=30)

    run("req", "-x509", "-new", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=balancer bench ca")
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                          "extendedKeyUsage=serverAuth\n")
    run("req", "-new", *key, "-keyout", "server.key", "-out", "server.csr", "-subj",
        "/CN=balancer bench server")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext")
    return {"ca": str(directory / "ca.crt"), "cert": str(directory / "server.crt"),
            "key": str(directory / "server.key")}


def tls_redis(procs: Procs, files: dict[str, str]) -> int:
    """A TLS-only redis-server (no client certificates asked); returns its port."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is required (Debian package redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs.spawn(f"redis-tls-{port}", [
        binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--tls-cert-file", files["cert"], "--tls-key-file",
        files["key"], "--tls-ca-cert-file", files["ca"], "--tls-auth-clients", "no"])
    client = redis.Redis(port=port, ssl=True, ssl_ca_certs=files["ca"], socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                return port
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the TLS redis-server on {port} did not start")
        time.sleep(0.05)


def process_cpu(pid: int) -> float:
    """User + system seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def redis_cpu(client: redis.Redis) -> tuple[dict[str, tuple[int, int]], float]:
    """({command: (calls, usec)} but INFO, process CPU seconds)."""
    stats = client.info("commandstats")
    commands = {k.removeprefix("cmdstat_"): (v["calls"], v["usec"])
                for k, v in stats.items() if k != "cmdstat_info"}
    cpu = client.info("cpu")
    return commands, cpu["used_cpu_user"] + cpu["used_cpu_sys"]


def command_deltas(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
                   requests: int) -> dict[str, dict[str, float]]:
    """Per command: calls per request and µs per call over a measurement."""
    out = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0))
        if calls > calls0:
            out[name] = {"calls_per_request": (calls - calls0) / requests,
                         "usec_per_call": (usec - usec0) / (calls - calls0)}
    return out


def round_trips(gateway: str) -> float:
    total = 0.0
    for line in get_text(gateway + "/metrics").splitlines():
        if line.startswith("balancer_store_round_trips_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def measure(procs: Procs, workdir: Path, sim: str, config: str, client_path: str,
            load: Load, seconds: float, warmup: float, rounds: int) -> dict[str, Any]:
    """Both transports side by side; medians over `rounds` interleaved measurements."""
    files = tls_files(workdir / "tls")
    plain_port, tls_port = procs.redis(), tls_redis(procs, files)
    targets = {
        "plain": (f"redis://127.0.0.1:{plain_port}/0", config,
                  redis.Redis(port=plain_port, socket_timeout=5)),
        "tls": (f"rediss://127.0.0.1:{tls_port}/0",
                config.replace('store: {url: "${STORE_URL}"}',
                               f'store: {{url: "${{STORE_URL}}", ca_file: "{files["ca"]}"}}'),
                redis.Redis(port=tls_port, ssl=True, ssl_ca_certs=files["ca"],
                            socket_timeout=5))}
    servers = {}
    for name, (url, text, _) in targets.items():
        path = workdir / f"regions-costs-{name}.yaml"
        path.write_text(text)
        servers[name] = procs.launch(f"gateway-costs-{name}", [
            PYTHON, "-m", "balancer.cli", "serve", "--config", str(path), "--host",
            "127.0.0.1", "--port", "{port}"], "/healthz",
            {"SIM_URL": sim, "STORE_URL": url, "BALANCER_LOG_LEVEL": "INFO"})
    procs.ready(*servers.values())
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for rnd in range(rounds):
        for name in (list(targets) if rnd % 2 == 0 else list(targets)[::-1]):
            server, client = servers[name], targets[name][2]
            url = server.url + client_path
            if warmup > 0:
                load(url, warmup)
            trips0, (cmd0, rcpu0), cpu0 = (round_trips(server.url), redis_cpu(client),
                                            process_cpu(server.proc.pid))
            result = load(url, seconds)
            trips1, (cmd1, rcpu1), cpu1 = (round_trips(server.url), redis_cpu(client),
                                            process_cpu(server.proc.pid))
            n = max(1, result["requests"])
            usec0, usec1 = (sum(u for k, (_, u) in c.items() if k in SCRIPTS)
                            for c in (cmd0, cmd1))
            runs[name].append({
                "requests": result["requests"], "rps": result["rps"],
                "round_trips": (trips1 - trips0) / n,
                "redis_command_us_per_1000": (usec1 - usec0) / n * 1000,
                "redis_process_us_per_1000": (rcpu1 - rcpu0) * 1e6 / n * 1000,
                "gateway_cpu_us": (cpu1 - cpu0) * 1e6 / n,
                "commands": command_deltas(cmd0, cmd1, n)})
    for _, _, client in targets.values():
        client.close()
    return {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]
                   if key != "commands"}
            | {"degradations": procs.log(f"gateway-costs-{name}").count("degraded mode:"),
               "runs": rs}
            for name, rs in runs.items()}


def render(costs: dict[str, Any], concurrency: int) -> str:
    from bench import report

    rows = [[f"gateway-redis ({'TLS' if name == 'tls' else 'plain TCP'})",
             f"{row['rps']:,.0f}", f"{row['round_trips']:.2f}",
             f"{row['redis_command_us_per_1000']:,.0f} µs",
             f"{row['redis_process_us_per_1000']:,.0f} µs", f"{row['gateway_cpu_us']:,.0f} µs",
             str(row["degradations"])]
            for name, row in costs.items()]
    return (f"Costs per request (concurrency {concurrency}, medians):\n\n" + report.table(
        ["path", "req/s", "store round trips / request", "Redis script time / 1,000 req",
         "Redis process CPU / 1,000 req", "gateway CPU / request", "store degradations"],
        rows))
