"""Store backends for the conformance suite, and the Redis servers they need.

Every test that takes `make_store` runs once per backend (the pattern of
alisaifee/limits `tests/utils.py`): memory, fakeredis, a real Redis, and a real
three-node Redis Cluster that this file starts on free ports. Redis tests use a
fresh key prefix each, so parallel runs on one server never collide.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
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


class PipelineCounter:
    """Counts the pipelines a redis-py client opens: the store's batching sends the
    script calls of one event-loop turn as one pipeline (capacity/batching.py)."""

    def __init__(self, client: Any):
        self.count = 0
        self._pipeline = client.pipeline
        client.pipeline = self._counted

    def _counted(self, *args: Any, **kw: Any) -> Any:
        self.count += 1
        return self._pipeline(*args, **kw)


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


OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class TLSFiles:
    """A test CA, a server certificate for 127.0.0.1 / localhost (also usable as a client
    certificate: Redis presents it to other nodes when replicating over TLS), a client
    certificate, and a second CA that signed none of them. EC P-256 keys: quick to make."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


def make_tls_files(directory: Path) -> TLSFiles:
    """Made with the openssl command in `directory`, valid for two days."""
    if OPENSSL is None:
        pytest.skip("no openssl binary on PATH")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=d, check=True, capture_output=True, timeout=30)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-new", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
            "-days", "2", "-subj", f"/CN=balancer test {ca}")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                  "extendedKeyUsage=serverAuth,clientAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        run("req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
            f"/CN=balancer test {name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return TLSFiles(str(d / "ca.crt"), str(d / "server.crt"), str(d / "server.key"),
                    str(d / "client.crt"), str(d / "client.key"), str(d / "other-ca.crt"))


class RedisServer:
    """A redis-server process this test session started (and alone may stop).

    `tls`: TLS only (`--port 0 --tls-port <port>`), with `tls_auth_clients` asking every
    client for a certificate the CA signed (mutual TLS). `username`: an ACL user (give
    its `--user` rule in `args`) with `password`; otherwise `password` is requirepass."""

    def __init__(self, port: int, workdir: str, *args: str, password: str | None = None,
                 username: str | None = None, tls: TLSFiles | None = None,
                 tls_auth_clients: bool = False):
        self.port = port
        self.workdir = workdir
        self.args = args
        self.password = password
        self.username = username
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.username or ''}:{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        tls: dict[str, Any] = {}
        if self.tls:
            tls = {"ssl": True, "ssl_ca_certs": self.tls.ca,
                   "ssl_certfile": self.tls.client_cert, "ssl_keyfile": self.tls.client_key}
        return redis.Redis(port=self.port, username=self.username, password=self.password,
                           socket_timeout=5, **tls)

    def tls_args(self) -> list[str]:
        """The server options of TLS (the port as TLS-only when `tls`)."""
        if self.tls is None:
            return ["--port", str(self.port)]
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file",
                self.tls.server_cert, "--tls-key-file", self.tls.server_key,
                "--tls-ca-cert-file", self.tls.ca, "--tls-auth-clients",
                "yes" if self.tls_auth_clients else "no", "--tls-replication", "yes"]

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        cmd = [
            REDIS_SERVER,
            *self.tls_args(),
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
        if self.password and not self.username:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()
        return self

    def wait_ready(self, within: float = 10.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + within
        while True:
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on {self.port}") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and (self.tls or self.username):
            # redis-cli would need the TLS and ACL options: SIGTERM is a shutdown too.
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
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


SENTINEL_MASTER = "mymaster"


class SentinelSet:
    """A primary, one replica and three sentinels (quorum 2) on free ports, each with a
    writable config of its own in `workdir`: `with SentinelSet(...) as s:` starts them,
    waits until every sentinel sees the replica and the two other sentinels, and stops
    them all at the end. `password`: requirepass everywhere (sentinels and data nodes,
    `masterauth` and `auth-pass` to match); `tls`: every port TLS only, replication and
    sentinel links too."""

    def __init__(self, workdir: Path, *, password: str | None = None,
                 tls: TLSFiles | None = None):
        self.workdir = Path(workdir)
        self.password = password
        self.tls = tls
        self.primary: RedisServer | None = None
        self.replica: RedisServer | None = None
        self.sentinels: list[RedisServer] = []

    def __enter__(self) -> SentinelSet:
        need_redis_binary()
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"{'rediss' if self.tls else 'redis'}+sentinel://{auth}{hosts}/{SENTINEL_MASTER}"

    def _data_node(self, *args: str) -> RedisServer:
        auth = ("--masterauth", self.password) if self.password else ()
        return RedisServer(free_port(), str(self.workdir), *auth, *args,
                           password=self.password, tls=self.tls).start()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.primary = self._data_node()
        self.replica = self._data_node("--replicaof", "127.0.0.1", str(self.primary.port))
        for _ in range(3):
            port = free_port()
            conf = self.workdir / f"sentinel-{port}.conf"
            lines = ["bind 127.0.0.1", f"dir {self.workdir}",
                     f"logfile {self.workdir}/sentinel-{port}.log",
                     f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {self.primary.port} 2",
                     f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000",
                     f"sentinel failover-timeout {SENTINEL_MASTER} 3000",
                     f"sentinel parallel-syncs {SENTINEL_MASTER} 1"]
            if self.password:
                lines += [f"sentinel auth-pass {SENTINEL_MASTER} {self.password}",
                          f"requirepass {self.password}", f"sentinel sentinel-pass {self.password}"]
            conf.write_text("\n".join(lines) + "\n")
            sentinel = RedisServer(port, str(self.workdir), password=self.password, tls=self.tls)
            self.sentinels.append(sentinel)
            assert REDIS_SERVER is not None
            sentinel.proc = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel",
                                              *sentinel.tls_args()],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for sentinel in self.sentinels:
            sentinel.wait_ready()
        deadline = time.monotonic() + 20
        while not all(self._sees_everyone(s) for s in self.sentinels):
            if time.monotonic() > deadline:
                pytest.fail("the sentinels never saw the replica and each other")
            time.sleep(0.1)

    def _sees_everyone(self, sentinel: RedisServer) -> bool:
        with sentinel.client() as c:
            state = c.sentinel_master(SENTINEL_MASTER)
        return int(state["num-other-sentinels"]) == 2 and int(state["num-slaves"]) == 1

    def primary_address(self, sentinel: int = 0) -> tuple[str, int]:
        """Where a sentinel says the primary is (SENTINEL get-master-addr-by-name)."""
        with self.sentinels[sentinel].client() as c:
            host, port = c.sentinel_get_master_addr_by_name(SENTINEL_MASTER)
        return (host.decode() if isinstance(host, bytes) else host), int(port)

    def close(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            if server is not None:
                server.kill()  # SIGKILL: a stopping sentinel might start a failover


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
