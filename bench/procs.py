"""Real processes for the benchmarks: redis-server, the simulator, gateways, proxies and
load generators. Everything listens on 127.0.0.1, every process is stopped at the end
(also on failure or Ctrl-C), and each one's output goes to a log file in `workdir`."""

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
from types import TracebackType
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
              ) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} "
                               "answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not come up in {timeout} s")
        time.sleep(0.05)


def get_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict[str, Any], timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Server(NamedTuple):
    """An HTTP server started by `Procs.launch`, not yet known to answer."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    health: str  # a path


class Procs:
    """Starts processes and guarantees they stop (SIGTERM, then SIGKILL). A context
    manager: leaving the block, normally or by an exception, stops them all."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def redis(self) -> int:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is required (Debian package redis-server)")
        port = free_port()
        self.spawn(f"redis-{port}", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no"])
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return port
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on {port} did not start")
            time.sleep(0.05)

    def server(self, name: str, args: list[str], health: str,
               env: dict[str, str] | None = None) -> str:
        """Start an HTTP server whose args contain the literal `{port}`; returns its URL
        once `health` (a path) answers."""
        server = self.launch(name, args, health, env)
        self.ready(server, timeout=20.0)
        return server.url

    def launch(self, name: str, args: list[str], health: str,
               env: dict[str, str] | None = None) -> Server:
        """Start an HTTP server whose args contain the literal `{port}`, without waiting
        for it: several start side by side, then `ready` waits for them all."""
        port = free_port()
        proc = self.spawn(name, [a.replace("{port}", str(port)) for a in args], env)
        return Server(name, proc, f"http://127.0.0.1:{port}", health)

    def ready(self, *servers: Server, timeout: float = 30.0) -> None:
        """Wait until each server's health path answers; a server that exits or stays
        silent is an error with the end of its log."""
        for s in servers:
            try:
                wait_http(s.url + s.health, timeout=timeout, proc=s.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n--- {s.name} log ---\n{self.log(s.name)[-3000:]}"
                                   ) from None

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
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()
