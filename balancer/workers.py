"""`balancer serve --workers N`: a supervisor and N gateway processes on one port.

The supervisor (the process started) does not serve. It starts N workers, each a
`balancer serve` of its own (a fresh interpreter: `sys.executable -m balancer.cli`, so
nothing is inherited by fork: each has its own request-id prefix, Redis connections and
replica id), all listening on the same host and port with SO_REUSEPORT: the kernel
spreads connections over them. They share the capacity store (Redis; the memory store
is refused: `cli.run_serve`), so each is one replica in the store's heartbeat count.

- SIGTERM / SIGINT: forwarded to every worker; each drains as a single process does
  (readiness off, in-flight requests finish) and exits 0; then so does the supervisor.
- SIGHUP: forwarded; every worker reloads its config.
- A worker that exits while nobody asked it to is restarted after 1 s, with an error
  logged. More than `MAX_RESTARTS` such exits within `RESTART_WINDOW` seconds means
  something is wrong that restarting will not fix: the supervisor stops the others
  (drained, as on SIGTERM) and exits 1, for the process manager to see.
- Metrics: prometheus_client's multiprocess mode. The supervisor makes a private
  directory, PROMETHEUS_MULTIPROC_DIR of every worker (values live in files there),
  marks a dead worker's live gauges dead, and removes the directory at exit. Whichever
  worker a scrape reaches renders every worker's values (`metrics.exposition_registry`).
- `--simulate`: the simulated regions run once, in the supervisor, and every worker is
  pointed at them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

from prometheus_client import multiprocess

from balancer.config import Config

log = logging.getLogger("balancer")

MAX_RESTARTS = 5  # unexpected exits tolerated within RESTART_WINDOW seconds
RESTART_WINDOW = 60.0
RESTART_DELAY = 1.0


@dataclass
class _Supervisor:
    argv: list[str]  # the worker command line, without --worker-id
    env: dict[str, str]
    metrics_dir: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    procs: dict[int, asyncio.subprocess.Process] = field(default_factory=dict)
    exits: list[float] = field(default_factory=list)  # times of unexpected exits
    failed: bool = False

    def signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def keep(self, worker: int) -> int:
        """Run worker `worker` until the supervisor stops; restart it when it dies."""
        while True:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, "--worker-id", str(worker), env=self.env)
            self.procs[worker] = proc
            if self.stop.is_set():  # stopped while it was starting
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
            multiprocess.mark_process_dead(proc.pid, self.metrics_dir)
            if self.stop.is_set():
                if code != 0:
                    log.error("worker %d (pid %d) exited with %s while stopping",
                              worker, proc.pid, _status(code))
                return code
            now = time.monotonic()
            self.exits = [t for t in self.exits if now - t < RESTART_WINDOW] + [now]
            if len(self.exits) > MAX_RESTARTS:
                log.error("worker %d (pid %d) exited with %s: %d unexpected worker exits "
                          "within %.0f s, giving up: stopping every worker", worker, proc.pid,
                          _status(code), len(self.exits), RESTART_WINDOW)
                self.failed = True
                self.stop.set()
                return code
            log.error("worker %d (pid %d) exited unexpectedly with %s: restarting it in "
                      "%.0f s", worker, proc.pid, _status(code), RESTART_DELAY)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), RESTART_DELAY)
            if self.stop.is_set():
                return 0


def _status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def worker_argv(cfg: Config, *, log_level: str, simulate: bool, time_scale: float | None,
                sim_url: str | None) -> list[str]:
    """One worker's `balancer serve` command line: the supervisor's effective options."""
    argv = [sys.executable, "-m", "balancer.cli", "--log-level", log_level, "serve",
            "--config", cfg.source, "--host", cfg.listen.host, "--port", str(cfg.listen.port)]
    if time_scale:
        argv += ["--time-scale", repr(time_scale)]
    if simulate:
        argv.append("--simulate")
    if sim_url is not None:
        argv += ["--sim-url", sim_url]
    return argv


async def supervise(cfg: Config, count: int, *, log_level: str, simulate: bool,
                    time_scale: float | None) -> int:
    try:
        metrics_dir = tempfile.mkdtemp(prefix="balancer-metrics-")
    except OSError as exc:
        log.error("--workers needs a writable temporary directory for the workers' metrics "
                  "(TMPDIR, default /tmp): %s", exc)
        return 1
    sim_runner = None
    try:
        sim_url = None
        if simulate:
            from balancer import sim

            sim_runner, sim_url = await sim.start(sim.simulator_config(cfg))
            log.info("simulated regions at %s (shared by the workers): %s", sim_url,
                     ", ".join(r.name for r in cfg.regions))
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        sup = _Supervisor(worker_argv(cfg, log_level=log_level, simulate=simulate,
                                      time_scale=time_scale, sim_url=sim_url),
                          env, metrics_dir)
        loop = asyncio.get_running_loop()

        def terminate() -> None:
            sup.stop.set()
            sup.signal_all(signal.SIGTERM)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, terminate)
        loop.add_signal_handler(signal.SIGHUP, lambda: sup.signal_all(signal.SIGHUP))
        tasks = [asyncio.create_task(sup.keep(i), name=f"balancer-worker-{i}")
                 for i in range(count)]
        await asyncio.sleep(0)  # let each start its process
        log.info("supervisor %d: %d workers on http://%s:%d (SO_REUSEPORT), metrics in %s",
                 os.getpid(), count, cfg.listen.host, cfg.listen.port, metrics_dir)
        await sup.stop.wait()
        if sup.failed:  # a give-up stops the others (a SIGTERM has forwarded itself)
            sup.signal_all(signal.SIGTERM)
        codes = await asyncio.gather(*tasks)
        log.info("workers stopped (%s)", ", ".join(_status(c) for c in codes))
        return 1 if sup.failed or any(codes) else 0
    finally:
        if sim_runner is not None:
            await sim_runner.cleanup()
        shutil.rmtree(metrics_dir, ignore_errors=True)
