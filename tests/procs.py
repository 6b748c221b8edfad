"""Real processes for end-to-end tests: redis-server, the simulator, gateway replicas
and load generators. Everything listens on 127.0.0.1 and is stopped at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not come up in {timeout} s")
        time.sleep(0.1)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


class Procs:
    """Starts processes and guarantees they stop (terminate, then kill)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def redis(self, port: int | None = None, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
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
        port = free_port()
        self.spawn("simulator", [PYTHON, "-m", "balancer.cli", "simulate", "--config",
                                 str(config), "--port", str(port), *extra], env)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_sim/stats")
        return url

    def gateway(self, name: str, config: Path, env: dict[str, str]) -> str:
        port = free_port()
        self.spawn(name, [PYTHON, "-m", "balancer.cli", "serve", "--config", str(config),
                          "--host", "127.0.0.1", "--port", str(port)], env)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz")
        return url

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
