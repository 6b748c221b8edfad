"""Redis client benchmark: the store's `acquire` script through each candidate client.

    .venv/bin/python -m bench.redis_clients                  # about 3 minutes
    .venv/bin/python -m bench.redis_clients --seconds 1 --clients redis-py,glide

The gateway makes one store call per request and is CPU bound, so what counts is the
CPU the client process spends per call (`time.process_time` delta / calls: every
thread of this process, so valkey-glide's Rust threads count too), beside calls/s.
Each client runs EVALSHA of the real `acquire` script (the text `RedisStore` loads),
with the keys and arguments `RedisStore.acquire` builds for three regions, from N
concurrent asyncio callers for a few seconds, against a plain and a TLS redis-server
that this script starts on 127.0.0.1 (certificates made with openssl in a temp dir).

Clients, each skipped when not installed (coredis and valkey-glide are no project
dependency: `pip install coredis valkey-glide` to measure them):

- store:            `RedisStore.from_config(...).acquire`, the whole store call as shipped
- redis-py+hiredis: `connect()` as the store does, `register_script` (EVALSHA, NOSCRIPT reload)
- redis-py (pure):  the same with redis-py's own Python RESP parser instead of hiredis
- coredis:          `coredis.Redis.from_url`, `register_script` (multiplexed connection)
- valkey-glide:     `GlideClient`, `invoke_script` (Rust core, one multiplexed connection)
- pipelined.py:     the former hand-written RESP client (plain TCP only), loaded from the
                    last git commit that has it: the reference the others replace

Besides the table it probes, per client: connections used at the top concurrency,
NOSCRIPT recovery after SCRIPT FLUSH, a TLS client certificate, and the exception
raised when nothing listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import shutil
import subprocess
import tempfile
import time
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import ROOT, Procs, free_port

Call = Callable[[list[str], list[str]], Awaitable[Any]]

MODEL = "gpt-4"
REGIONS = ("eastus2", "swedencentral", "westus3")
# Generous: the first calls open connections, and redis-py makes a new SSLContext (with the
# system trust store) for each TLS connection, about 50-80 ms of CPU each here.
TIMEOUT = 10.0
HUGE = 1e12  # a quota nobody exhausts: every call is a grant, as in the overhead benchmark


@dataclass
class Server:
    name: str
    url: str
    port: int
    tls: bool
    certs: Path | None = None


@dataclass
class Client:
    """An open client: `call(keys, args)` runs the acquire script once."""

    call: Call
    close: Callable[[], Awaitable[None]]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- servers


def make_certs(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=bench-ca")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.cnf").write_text("extendedKeyUsage=clientAuth\n")  # v3: rustls wants it
    for who, extra in (("server", ["-extfile", "san.cnf"]), ("client", ["-extfile", "client.cnf"])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out",
            f"{who}.csr", "-subj", f"/CN={who}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{who}.crt", "-days", "2", *extra)


def start_servers(procs: Procs, certs: Path) -> list[Server]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is required (Debian package redis-server)")
    plain = procs.redis()
    port = free_port()
    procs.spawn(f"redis-tls-{port}", [
        binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no",
        "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key"),
        "--tls-ca-cert-file", str(certs / "ca.crt"),
        "--tls-auth-clients", "optional",  # verified when presented (the mTLS probe)
    ])
    ca = certs / "ca.crt"
    tls = Server("tls", f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}", port, True, certs)
    import redis  # the probe client; redis-py is a project dependency

    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis.from_url(tls.url, socket_timeout=1).ping():
                break
        except (redis.RedisError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError("the TLS redis-server did not start") from None
            time.sleep(0.05)
    return [Server("plain", f"redis://127.0.0.1:{plain}/0", plain, False), tls]


def sync_client(server: Server) -> Any:
    import redis

    return redis.Redis.from_url(server.url, socket_timeout=5)


# --------------------------------------------------------------------------- workload


def script_text() -> str:
    from balancer.capacity.redis import _script

    return _script("acquire")


async def acquire_call(prefix: str) -> tuple[list[str], list[str]]:
    """The keys and args `RedisStore.acquire` sends, captured from the store itself so
    they follow its current argument format."""
    from redis.asyncio import Redis

    from balancer.capacity.redis import RedisStore

    captured: dict[str, list[str]] = {}

    async def record(*, keys: list[str], args: list[str]) -> list[Any]:
        captured.update(keys=list(keys), args=list(args))
        return [1, 100, "1.0"]

    client = Redis()  # never connects
    store = RedisStore(client, key_prefix=prefix)
    store._acquire = record  # type: ignore[assignment]
    await store.acquire(MODEL, limits(), 100, 0.5)
    with contextlib.suppress(Exception):
        await store.close()
    return captured["keys"], captured["args"]


def limits() -> list[Any]:
    from balancer.policy import Limits

    return [Limits(r, HUGE, HUGE, HUGE, HUGE) for r in REGIONS]


# --------------------------------------------------------------------------- clients


async def open_redis_py(server: Server, *, hiredis: bool = True, batched: bool = False
                        ) -> Client:
    from redis.asyncio.connection import _AsyncRESP2Parser

    from balancer.capacity.redis import connect
    from balancer.config import StoreConfig

    client = connect(StoreConfig(url=server.url, timeout_seconds=TIMEOUT))
    if not hiredis:
        client.connection_pool.connection_kwargs["parser_class"] = _AsyncRESP2Parser
    script = client.register_script(script_text())
    if batched:
        from balancer.capacity.batching import BatchedScript

        script = BatchedScript(client, script, TIMEOUT)  # type: ignore[assignment]

    async def call(keys: list[str], args: list[str]) -> Any:
        return await script(keys=keys, args=args)

    return Client(call, client.aclose)


async def open_store(server: Server) -> Client:
    from balancer.capacity.redis import RedisStore
    from balancer.config import StoreConfig

    store = RedisStore.from_config(StoreConfig(url=server.url, timeout_seconds=TIMEOUT,
                                               key_prefix="bench-store"))
    regions = limits()

    async def call(keys: list[str], args: list[str]) -> Any:
        return await store.acquire(MODEL, regions, 100, 0.5)

    return Client(call, store.close)


async def open_coredis(server: Server) -> Client:
    import coredis

    stack = contextlib.AsyncExitStack()
    client = coredis.Redis.from_url(server.url, stream_timeout=TIMEOUT, connect_timeout=TIMEOUT)
    await stack.enter_async_context(client)  # coredis 6: the pool runs in a task group
    script = client.register_script(script_text())

    async def call(keys: list[str], args: list[str]) -> Any:
        return await script(keys=keys, args=args)

    return Client(call, stack.aclose)


async def glide_client(server: Server, *, client_cert: bool = False) -> Any:
    """A valkey-glide client for `server`: TLS with the test CA when it serves TLS, and
    with this bench's client certificate when asked."""
    from glide import (
        AdvancedGlideClientConfiguration,
        GlideClient,
        GlideClientConfiguration,
        NodeAddress,
        TlsAdvancedConfiguration,
    )

    advanced = None
    if server.tls:
        d = server.certs
        assert d is not None
        certs = {"client_cert_pem": (d / "client.crt").read_bytes(),
                 "client_key_pem": (d / "client.key").read_bytes()} if client_cert else {}
        advanced = AdvancedGlideClientConfiguration(tls_config=TlsAdvancedConfiguration(
            root_pem_cacerts=(d / "ca.crt").read_bytes(), **certs))
    config = GlideClientConfiguration([NodeAddress("127.0.0.1", server.port)],
                                      use_tls=server.tls, request_timeout=int(TIMEOUT * 1000),
                                      advanced_config=advanced)
    return await GlideClient.create(config)


async def open_glide(server: Server) -> Client:
    from glide import Script

    client = await glide_client(server)
    script = Script(script_text())

    async def call(keys: list[str], args: list[str]) -> Any:
        return await client.invoke_script(script, keys=keys, args=args)  # type: ignore[arg-type]

    return Client(call, client.close)


PIPELINED = "balancer/capacity/pipelined.py"


def pipelined_source() -> str | None:
    """The removed hand-written client's source, from the last commit that had it."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else ""

    last = git("rev-list", "-1", "HEAD", "--", PIPELINED).strip()
    for rev in (last, f"{last}^") if last else ():
        if text := git("show", f"{rev}:{PIPELINED}"):
            return text
    return None


def load_pipelined() -> Any:
    try:
        return importlib.import_module("balancer.capacity.pipelined")
    except ImportError:
        pass
    source = pipelined_source()
    if source is None:
        raise ImportError(f"{PIPELINED} is neither in the tree nor in git history")
    mod = types.ModuleType("pipelined_reference")
    exec(compile(source, PIPELINED, "exec"), mod.__dict__)
    return mod


async def open_pipelined(server: Server) -> Client:
    from redis.asyncio import Redis

    mod = load_pipelined()
    client = Redis.from_url(server.url, socket_timeout=TIMEOUT)
    conn = mod.PipelinedConnection.for_client(client, TIMEOUT)
    script = mod.PipelinedScript(conn, client.register_script(script_text()))

    async def call(keys: list[str], args: list[str]) -> Any:
        return await script(keys=keys, args=args)

    async def close() -> None:
        conn.close()
        await client.aclose()

    return Client(call, close)


@dataclass
class Candidate:
    name: str
    opener: Callable[[Server], Awaitable[Client]]
    module: str  # skipped when this module cannot be imported
    tls: bool = True


CANDIDATES = [
    Candidate("store (RedisStore.acquire)", open_store, "redis"),
    Candidate("pipelined.py (old reference)", open_pipelined, "pipelined", tls=False),
    Candidate("redis-py + hiredis", open_redis_py, "hiredis"),
    Candidate("redis-py + hiredis, batched per loop turn",
              lambda s: open_redis_py(s, batched=True), "hiredis"),
    Candidate("redis-py, pure-Python parser",
              lambda s: open_redis_py(s, hiredis=False), "redis"),
    Candidate("coredis", open_coredis, "coredis"),
    Candidate("valkey-glide", open_glide, "glide"),
]
SHORT = {"store": 0, "pipelined": 1, "redis-py": 2, "redis-py-batched": 3, "redis-py-pure": 4,
         "coredis": 5, "glide": 6}


def available(c: Candidate) -> bool:
    if c.module == "pipelined":
        return pipelined_source() is not None or importlib.util.find_spec(
            "balancer.capacity.pipelined") is not None
    try:
        return importlib.util.find_spec(c.module) is not None
    except ModuleNotFoundError:
        return False


# --------------------------------------------------------------------------- measuring


@dataclass
class Result:
    client: str
    server: str
    concurrency: int
    calls: int
    seconds: float
    cpu: float
    connections: int | None = None
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.calls * 1e6 if self.calls else float("nan")


async def run_one(client: Client, keys: list[str], args: list[str], concurrency: int,
                  seconds: float, server: Server, warmup: float = 0.3) -> Result:
    stop = False
    count = 0

    async def worker() -> None:
        nonlocal count
        while not stop:
            await client.call(keys, args)
            count += 1

    async def phase(duration: float) -> tuple[int, float, float, int]:
        nonlocal stop, count
        stop, count = False, 0
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.sleep(duration)
        calls, wall, cpu = count, time.perf_counter() - t0, time.process_time() - c0
        conns = await asyncio.to_thread(connected, server)  # while the callers still run
        stop = True
        await asyncio.gather(*tasks)
        return calls, wall, cpu, conns

    await phase(warmup)
    calls, wall, cpu, conns = await phase(seconds)
    return Result("", server.name, concurrency, calls, wall, cpu, connections=conns)


def connected(server: Server) -> int:
    """Connections that ran a command within the last second, less this probe: all the
    clients stay open side by side, and only the one being measured is busy."""
    with contextlib.closing(sync_client(server)) as r:
        return sum(1 for c in r.client_list()
                   if int(c["idle"]) == 0 and c["cmd"] not in ("client|list", "client"))


async def probe_noscript(client: Client, server: Server, keys: list[str], args: list[str]
                         ) -> str:
    with contextlib.closing(sync_client(server)) as r:
        r.script_flush()
    try:
        await client.call(keys, args)
        return "yes"
    except Exception as exc:
        return f"no ({type(exc).__name__})"


async def probe_refused(c: Candidate) -> str:
    port = free_port()  # nothing listens there
    dead = Server("dead", f"redis://127.0.0.1:{port}/0", port, False)
    try:
        async with asyncio.timeout(10):
            client = await c.opener(dead)
            try:
                await client.call(["k"], ["1"])
            finally:
                with contextlib.suppress(Exception):
                    await client.close()
    except Exception as exc:
        t = type(exc)
        return f"{t.__module__}.{t.__qualname__}"
    return "(no error)"


async def probe_mtls(c: Candidate, server: Server, keys: list[str], args: list[str]) -> str:
    """A client certificate through the URL (redis-py, coredis) or the config (glide)."""
    assert server.certs is not None
    d = server.certs
    if c.name.startswith("valkey-glide"):
        from glide import Script

        g = await glide_client(server, client_cert=True)
        try:
            await g.invoke_script(Script(script_text()), keys=keys, args=args)  # type: ignore[arg-type]
        finally:
            await g.close()
        return "yes"
    if c.name.startswith("coredis"):
        import coredis

        async with coredis.Redis(host="127.0.0.1", port=server.port, ssl=True,
                                 ssl_ca_certs=str(d / "ca.crt"),
                                 ssl_certfile=str(d / "client.crt"),
                                 ssl_keyfile=str(d / "client.key")) as cr:
            await cr.ping()
        return "yes"
    if c.name.startswith(("redis-py", "store")):
        mtls = Server("mtls", f"{server.url}&ssl_certfile={d / 'client.crt'}"
                      f"&ssl_keyfile={d / 'client.key'}", server.port, True, d)
        client = await c.opener(mtls)
        try:
            await client.call(keys, args)
        finally:
            await client.close()
        return "yes"
    return "n/a"


async def measure(candidates: list[Candidate], servers: list[Server],
                  concurrencies: list[int], seconds: float, rounds: int
                  ) -> tuple[list[Result], dict[str, dict[str, str]]]:
    """Each cell `rounds` times, the clients interleaved (so a burst of load from
    elsewhere on the machine hits them all alike); the median round is kept."""
    keys, args = await acquire_call("bench-clients")
    probes: dict[str, dict[str, str]] = {c.name: {} for c in candidates}
    samples: dict[tuple[str, str, int], list[Result]] = {}
    errors: list[Result] = []
    for server in servers:
        clients: dict[str, Client] = {}
        for c in candidates:
            if server.tls and not c.tls:
                continue
            try:
                clients[c.name] = await c.opener(server)
            except Exception as exc:
                errors.append(Result(c.name, server.name, 0, 0, 0, 0,
                                     error=f"{type(exc).__name__}: {exc}"))
        try:
            for i in range(rounds):
                for name, client in clients.items():
                    for n in concurrencies:
                        r = await run_one(client, keys, args, n, seconds, server)
                        r.client = name
                        samples.setdefault((name, server.name, n), []).append(r)
                        print(f"  round {i + 1} {name:30} {server.name:5} c={n:<3} "
                              f"{r.rate:8.0f} calls/s {r.cpu_us:7.1f} µs CPU/call "
                              f"conns={r.connections}", flush=True)
            for name, client in clients.items():
                if not name.startswith("store"):
                    probes[name][f"noscript-{server.name}"] = await probe_noscript(
                        client, server, keys, args)
        finally:
            for client in clients.values():
                await client.close()
    for c in candidates:
        probes[c.name]["refused"] = await probe_refused(c)
        tls = next((s for s in servers if s.tls), None)
        if tls is not None and c.tls:
            try:
                probes[c.name]["mtls"] = await probe_mtls(c, tls, keys, args)
            except Exception as exc:
                probes[c.name]["mtls"] = f"failed: {type(exc).__name__}: {exc}"
    results = [sorted(rs, key=lambda r: r.cpu_us)[len(rs) // 2] for rs in samples.values()]
    return results + errors, probes


def table(results: list[Result], concurrencies: list[int]) -> str:
    cols = [(s, n) for s in ("plain", "tls") for n in concurrencies]
    head = "| client | " + " | ".join(f"{s} c={n}: calls/s, CPU µs/call" for s, n in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    seen: dict[str, dict[tuple[str, int], Result]] = {}
    for r in results:
        seen.setdefault(r.client, {})[(r.server, r.concurrency)] = r
    for name, cells in seen.items():
        row = []
        for key in cols:
            r = cells.get(key)
            row.append("—" if r is None or r.error else f"{r.rate:,.0f} / {r.cpu_us:.1f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def versions() -> str:
    out = []
    for dist in ("redis", "hiredis", "coredis", "valkey-glide", "anyio"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            out.append(f"{dist} {version(dist)}")
    with contextlib.suppress(Exception):
        v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        out.append("redis-server " + v.stdout.split()[2].removeprefix("v="))
    return ", ".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="median of this many (default 3)")
    ap.add_argument("--concurrency", default="1,32", help="comma-separated (default 1,32)")
    ap.add_argument("--clients", default=",".join(SHORT),
                    help=f"comma-separated subset of {','.join(SHORT)}")
    a = ap.parse_args(argv)
    concurrencies = [int(x) for x in a.concurrency.split(",")]
    wanted = [CANDIDATES[SHORT[x]] for x in a.clients.split(",")]
    candidates = [c for c in wanted if available(c)]
    for c in wanted:
        if c not in candidates:
            print(f"skipped {c.name}: {c.module} not importable")
    with tempfile.TemporaryDirectory(prefix="bench-redis-clients-") as tmp:
        certs = Path(tmp) / "certs"
        certs.mkdir()
        make_certs(certs)
        with Procs(Path(tmp) / "logs") as procs:
            servers = start_servers(procs, certs)
            results, probes = asyncio.run(measure(candidates, servers, concurrencies,
                                                  a.seconds, a.rounds))
    print()
    print(versions())
    print()
    print(table(results, concurrencies))
    print()
    print(f"| client | conns at c={max(concurrencies)} (plain) | NOSCRIPT reload plain/tls "
          "| TLS client cert | error when nothing listens |")
    print("|---|---:|---|---|---|")
    for c in candidates:
        p = probes.get(c.name, {})
        conns = next((r.connections for r in results if r.client == c.name
                      and r.server == "plain" and r.concurrency == max(concurrencies)), None)
        ns = f"{p.get('noscript-plain', '—')}/{p.get('noscript-tls', '—')}"
        print(f"| {c.name} | {conns} | {ns} | {p.get('mtls', '—')} | {p.get('refused')} |")
    for r in results:
        if r.error:
            print(f"error: {r.client} on {r.server}: {r.error}")


if __name__ == "__main__":
    main()
