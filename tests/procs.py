"""Real processes for end-to-end tests: redis-server, the simulator, gateway replicas
and load generators. Everything listens on 127.0.0.1 and is stopped at the end.

The process plumbing is the benchmarks' (`bench/procs.py`); this adds what tests need:
a redis-server on a chosen port (to restart it where it was) and the balancer's own
servers by name."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from bench import procs as base
from bench.procs import PYTHON, ROOT, free_port, get_json, wait_http

__all__ = ["PYTHON", "ROOT", "Procs", "free_port", "get_json", "wait_http"]


class Procs(base.Procs):
    def redis(self, port: int | None = None, *extra: str  # type: ignore[override]
              ) -> tuple[subprocess.Popen[bytes], int]:
        """A redis-server on `port` (default: a free one); `extra` are more server options,
        e.g. "--enable-debug-command", "yes" or "--requirepass", PW."""
        port = port or free_port()
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required (.ci/run installs it)"
        proc = self.spawn(f"redis-{port}", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                            "--save", "", "--appendonly", "no", *extra])
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up (maybe locked)
                        return proc, port
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not start")
            time.sleep(0.05)

    def simulator(self, config: Path, *extra: str, env: dict[str, str] | None = None) -> str:
        return self.server("simulator", [PYTHON, "-m", "balancer.cli", "simulate", "--config",
                                         str(config), "--port", "{port}", *extra],
                           "/_sim/stats", env)

    def gateway(self, name: str, config: Path, env: dict[str, str]) -> str:
        return self.server(name, [PYTHON, "-m", "balancer.cli", "serve", "--config",
                                  str(config), "--host", "127.0.0.1", "--port", "{port}"],
                           "/healthz", env)
