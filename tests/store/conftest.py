"""Store backends for the conformance suite, and the Redis servers they need.

Every test that takes `make_store` runs once per backend (the pattern of
alisaifee/limits `tests/utils.py`): memory, fakeredis, a real Redis, and a real
three-node Redis Cluster that this file starts on free ports. Redis tests use a
fresh key prefix each, so parallel runs on one server never collide.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from balancer.capacity.base import CapacityStore
from balancer.capacity.memory import MemoryStore
from balancer.capacity.redis import RedisStore, connect
from balancer.config import StoreConfig
from balancer.policy import Limits

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")

BACKENDS = ["memory", "fakeredis", "redis", "cluster"]
REDIS_BACKENDS = BACKENDS[1:]
# Marks added to each backend's items: `-m "not redis"` runs without any server.
MARKS = {"redis": ("redis",), "cluster": ("redis", "redis_cluster")}

SLOW = 1e-9  # a refill rate that stays negligible over any test


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "redis: needs a redis-server (started if absent)")
    config.addinivalue_line("markers", "redis_cluster: needs a 3-node Redis Cluster it starts")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each backend's tests here rather than in pytest.param: this conftest's
    markers are not registered yet while it is imported."""
    here = Path(__file__).parent
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or here not in item.path.parents:
            continue
        for value in callspec.params.values():
            for mark in MARKS.get(value, ()) if isinstance(value, str) else ():
                item.add_marker(mark)


def lim(
    region: str,
    cap: float = 1000,
    rate: float = SLOW,
    *,
    rcap: float = 1000,
    rrate: float = SLOW,
    weight: float = 1.0,
    priority: int = 0,
) -> Limits:
    return Limits(region, cap, rate, rcap, rrate, weight, priority)


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 55000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisServer:
    """A redis-server process this test session started (and alone may stop)."""

    def __init__(self, port: int, workdir: str, *args: str, password: str | None = None):
        self.port = port
        self.workdir = workdir
        self.args = args
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=5)

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        cmd = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.workdir,
            "--logfile",
            f"{self.workdir}/redis-{self.port}.log",
            *self.args,
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on {self.port}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            cmd = [REDIS_CLI or "redis-cli", "-p", str(self.port)]
            if self.password:
                cmd += ["--no-auth-warning", "-a", self.password]
            subprocess.run([*cmd, "shutdown", "nosave"], capture_output=True, timeout=10)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def need_redis_binary() -> None:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("no redis-server/redis-cli binary on PATH")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The shared 127.0.0.1:6379 if it answers, else a server of our own."""
    if os.environ.get("BALANCER_TEST_REDIS_URL"):
        yield os.environ["BALANCER_TEST_REDIS_URL"]
        return
    try:
        redis.Redis(socket_timeout=1, socket_connect_timeout=1).ping()
        yield "redis://127.0.0.1:6379/0"
        return
    except redis.RedisError:
        pass
    need_redis_binary()
    with tempfile.TemporaryDirectory(prefix="bal-redis-") as tmp:
        server = RedisServer(free_port(), tmp).start()
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A real 3-primary Redis Cluster on free ports, for the whole session."""
    need_redis_binary()
    assert REDIS_CLI is not None
    with tempfile.TemporaryDirectory(prefix="bal-cluster-") as tmp:
        servers = []
        try:
            for _ in range(3):
                port = free_port()
                servers.append(
                    RedisServer(
                        port,
                        tmp,
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"{tmp}/nodes-{port}.conf",
                    ).start()
                )
            nodes = [f"127.0.0.1:{s.port}" for s in servers]
            subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *nodes,
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
            deadline = time.monotonic() + 20
            while not all(s.client().cluster("info")["cluster_state"] == "ok" for s in servers):
                if time.monotonic() > deadline:
                    pytest.fail("the test Redis Cluster never reached cluster_state:ok")
                time.sleep(0.05)
            yield f"redis+cluster://127.0.0.1:{servers[0].port}"
        finally:
            for s in servers:
                s.stop()


# --------------------------------------------------------------------------- stores


class Backends:
    """Makes stores of one backend. Stores made by one instance share their state
    (same server and key prefix) unless `fresh=True` asks for a clean slate."""

    def __init__(self, backend: str, request: pytest.FixtureRequest):
        self.backend = backend
        self.request = request
        self.prefix = f"t{uuid.uuid4().hex[:12]}"
        self.fake_server = fakeredis.FakeServer()
        self.clients: list[Any] = []
        self.stores: list[CapacityStore] = []

    @property
    def is_redis(self) -> bool:
        return self.backend != "memory"

    def config(self, **kw: Any) -> StoreConfig:
        url = {
            "redis": lambda: self.request.getfixturevalue("redis_url"),
            "cluster": lambda: self.request.getfixturevalue("cluster_url"),
        }[self.backend]()
        return StoreConfig(url=url, key_prefix=self.prefix, **kw)

    def client(self, *, new: bool = False) -> Any:
        if self.clients and not new:
            return self.clients[0]
        if self.backend == "fakeredis":
            client = fakeredis.FakeAsyncRedis(server=self.fake_server)
        else:
            client = connect(self.config(timeout_seconds=2.0))
        self.clients.append(client)
        return client

    def __call__(
        self,
        *,
        fresh: bool = False,
        new_client: bool = False,
        on_round_trip: Callable[[str], None] | None = None,
        key_ttl_seconds: int = 60,  # test keys on a shared server soon vanish
    ) -> CapacityStore:
        if self.backend == "memory":
            store: CapacityStore = MemoryStore()
        else:
            prefix = f"t{uuid.uuid4().hex[:12]}" if fresh else self.prefix
            store = RedisStore(
                self.client(new=new_client),
                key_prefix=prefix,
                key_ttl_seconds=key_ttl_seconds,
                on_round_trip=on_round_trip,
            )
        self.stores.append(store)
        return store

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


@pytest.fixture(params=BACKENDS)
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[Backends]:
    backends = Backends(request.param, request)
    yield backends
    await backends.aclose()


@pytest.fixture(params=REDIS_BACKENDS)
async def make_redis_store(request: pytest.FixtureRequest) -> AsyncIterator[Backends]:
    backends = Backends(request.param, request)
    yield backends
    await backends.aclose()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bal-test-") as tmp:
        yield Path(tmp)
