"""A pipelined Redis connection for the store's hot path: EVALSHA of its scripts.

redis-py's asyncio client spends 60-100 µs of CPU on each command (pool checkout,
retry wrapper, packing, parser, release), and the gateway makes one store call per
request: it was the largest single cost of a request (BENCHMARKS.md, "Overhead"). Here
every caller shares one socket: a command is written at once, Redis answers in order, and
each reply resolves the oldest waiting future (about 12 µs per call under load).

Only the scripts' calls come here, and only for a plain `redis://` TCP client (no TLS, no
unix socket, no cluster): anything else keeps redis-py, and so do the cold operations
(snapshot, heartbeat, ping). Errors are redis-py's own exception types, so callers such
as `ResilientStore` handle both paths the same way; a command unanswered within the
client's socket timeout fails every pending one and drops the connection, as redis-py
does, and the next call reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_INCOMPLETE = object()


def _encode(args: Sequence[str | bytes | int]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


def _error(line: bytes) -> ResponseError:
    text = line.decode(errors="replace")
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP2 reply at `pos`: (value, next position), or (_INCOMPLETE, pos)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind, line = buf[pos], buf[pos + 1:end]
    if kind == 58:  # ':'
        return int(line), end + 2
    if kind == 36:  # '$'
        n = int(line)
        if n < 0:
            return None, end + 2
        if len(buf) < end + 4 + n:
            return _INCOMPLETE, pos
        return buf[end + 2:end + 2 + n], end + 4 + n
    if kind == 42:  # '*'
        n = int(line)
        if n < 0:
            return None, end + 2
        items, p = [], end + 2
        for _ in range(n):
            item, p = _parse(buf, p)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, p
    if kind == 43:  # '+'
        return line, end + 2
    if kind == 45:  # '-'
        return _error(line), end + 2
    raise RedisConnectionError(f"unexpected reply type {chr(kind)!r} from Redis")


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedConnection):
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = \
            collections.deque()
        self.buffer = b""
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        pos = 0
        try:
            while pos < len(buf):
                value, nxt = _parse(buf, pos)
                if value is _INCOMPLETE:
                    break
                pos = nxt
                fut, _ = self.waiters.popleft()
                if not fut.done():  # a caller that gave up (timeout) is skipped
                    if isinstance(value, ResponseError):
                        fut.set_exception(value)
                    else:
                        fut.set_result(value)
        except (RedisConnectionError, ValueError, IndexError) as exc:
            self.fail(RedisConnectionError(f"unreadable reply from Redis: {exc}"))
            return
        self.buffer = buf[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"Redis closed the connection ({exc or 'EOF'})"))

    def fail(self, exc: Exception) -> None:
        """Fail every pending call and drop the connection: replies could not be matched
        to their callers any more."""
        self.lost = True
        while self.waiters:
            fut, _ = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()
        if self.owner.protocol is self:
            self.owner.protocol = None


class PipelinedConnection:
    """One multiplexed connection; safe for any number of concurrent callers on a loop."""

    def __init__(self, host: str, port: int, *, db: int = 0, username: str | None = None,
                 password: str | None = None, timeout: float = 0.25):
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.timeout = timeout
        self.protocol: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def for_client(cls, client: Any, timeout: float) -> PipelinedConnection | None:
        """A connection to the same server as a plain redis-py TCP client, else None."""
        if type(client) is not Redis:  # not a cluster client, not fakeredis
            return None
        pool = client.connection_pool
        kw = pool.connection_kwargs
        if pool.connection_class is not Connection or "host" not in kw:
            return None  # TLS (SSLConnection) or a unix socket
        return cls(kw["host"], int(kw.get("port", 6379)), db=int(kw.get("db", 0) or 0),
                   username=kw.get("username"), password=kw.get("password"),
                   timeout=kw.get("socket_timeout") or timeout)

    async def execute(self, *args: str | bytes | int) -> Any:
        protocol = self.protocol
        if protocol is None or protocol.lost or self._loop is not asyncio.get_running_loop():
            protocol = await self._connect()
        fut = self._loop.create_future()  # type: ignore[union-attr]
        protocol.waiters.append((fut, time.monotonic()))
        protocol.transport.write(_encode(args))  # type: ignore[union-attr]
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(  # type: ignore[union-attr]
                self.timeout, self._check)
        return await fut

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop (tests)
            self._loop, self._connecting, self.protocol = loop, None, None
            self._watchdog = None
        if self._connecting is None:
            self._connecting = loop.create_future()
            connecting = self._connecting
            try:
                protocol = await self._open(loop)
            except BaseException as exc:
                self._connecting = None
                connecting.set_exception(exc)
                connecting.exception()  # retrieved: no "never retrieved" warning
                raise
            self.protocol, self._connecting = protocol, None
            connecting.set_result(protocol)
            return protocol
        return await asyncio.shield(self._connecting)

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        try:
            async with asyncio.timeout(self.timeout):
                _, protocol = await loop.create_connection(lambda: _Protocol(self), self.host,
                                                           self.port)
        except TimeoutError:
            raise RedisTimeoutError(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to {self.host}:{self.port}: "
                                       f"{exc.strerror or exc}") from None
        setup: list[list[str | bytes | int]] = []
        if self.password:
            setup.append(["AUTH", *([self.username] if self.username else []), self.password])
        if self.db:
            setup.append(["SELECT", self.db])
        for command in setup:
            fut = loop.create_future()
            protocol.waiters.append((fut, time.monotonic()))
            assert protocol.transport is not None
            protocol.transport.write(_encode(command))
            try:
                async with asyncio.timeout(self.timeout):
                    await fut
            except BaseException:
                protocol.fail(RedisConnectionError("Redis connection setup failed"))
                raise
        return protocol

    def _check(self) -> None:
        """One timer for all pending calls: the oldest unanswered past the timeout means
        Redis (or the network) is stuck, so fail them all and reconnect next time."""
        self._watchdog = None
        protocol = self.protocol
        if protocol is None or not protocol.waiters or self._loop is None:
            return
        oldest = protocol.waiters[0][1]
        late = time.monotonic() - oldest
        if late >= self.timeout:
            protocol.fail(RedisTimeoutError(f"Redis did not answer within {self.timeout:g} s"))
            return
        self._watchdog = self._loop.call_later(self.timeout - late, self._check)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.protocol is not None:
            self.protocol.fail(RedisConnectionError("connection closed"))
            self.protocol = None


class PipelinedScript:
    """A registered script called through a `PipelinedConnection`: the same call shape as
    redis-py's AsyncScript (`await script(keys=[...], args=[...])`), and the same NOSCRIPT
    handling (load it, then run it again)."""

    def __init__(self, connection: PipelinedConnection, script: Any):
        self.connection = connection
        self.sha: str = script.sha
        self.script: str | bytes = script.script

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[str | bytes | int] = ()
                       ) -> Any:
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return await self.connection.execute(*command)
        except NoScriptError:
            await self.connection.execute("SCRIPT", "LOAD", self.script)
            return await self.connection.execute(*command)
