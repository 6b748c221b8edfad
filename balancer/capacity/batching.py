"""Script calls made in the same event-loop turn go to Redis as one pipeline.

redis-py's asyncio client spends most of a store call's CPU on fixed per-command
work: a pool checkout, the retry wrapper, a write and a read per call. Under load many
requests reach admission in the same turn of the event loop, so their script calls are
queued and sent on the next turn as one redis-py pipeline (no MULTI: each call stays
its own atomic script): one connection, one write, one read for all of them. A call
made while nothing else is on its way goes straight through as a plain EVALSHA, so a
lone request waits for no turn. BENCHMARKS.md section 4 has the CPU per call both ways.
The same on TLS (`rediss://`) and behind Sentinel: the pipeline is the client's own, and
only its connection class differs (redis-py's SSLConnection, SentinelManagedConnection).

Callers see exactly what a direct call gives: the script's reply, or redis-py's own
exception (a reply error, a connection error), or TimeoutError past `timeout`. A
caller that stops waiting (its deadline) leaves the rest of the batch alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Client = Redis | RedisCluster
Pending = tuple[Sequence[str], Sequence[str], asyncio.Future[Any]]


class BatchedScript:
    """Call it as a redis-py script object: `await script(keys=[...], args=[...])`."""

    def __init__(self, client: Client, script: AsyncScript, timeout: float):
        self.client = client
        self.script = script
        self.timeout = timeout  # bound on one batch's trip (its callers have their own)
        self._pending: list[Pending] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy = 0  # calls and batches on their way to Redis

    async def __call__(self, *, keys: Sequence[str], args: Sequence[str]) -> Any:
        if not self._busy and not self._pending:  # nothing to share a trip with: go now
            self._busy += 1
            try:
                return await self.script(keys=keys, args=args)
            finally:
                self._busy -= 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((keys, args, future))
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        batch = [p for p in batch if not p[2].done()]  # callers that gave up already
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)  # a strong reference until it ends
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[Pending]) -> None:
        self._busy += 1
        try:
            if len(batch) == 1:
                keys, args, future = batch[0]
                async with asyncio.timeout(self.timeout):
                    reply = await self.script(keys=keys, args=args)
                _resolve(future, reply)
                return
            async with asyncio.timeout(self.timeout):
                replies = await self._pipeline(batch)
            if any(isinstance(r, NoScriptError) for r in replies):
                # A restarted or flushed Redis lost the script: load it once, send again.
                again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                async with asyncio.timeout(self.timeout):
                    await self.client.script_load(self.script.script)
                    retried = await self._pipeline([batch[i] for i in again])
                for i, reply in zip(again, retried, strict=True):
                    replies[i] = reply
            for (_, _, future), reply in zip(batch, replies, strict=True):
                _resolve(future, reply)
        except BaseException as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._busy -= 1

    async def _pipeline(self, batch: list[Pending]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(self.script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))


def _resolve(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():
        return
    if isinstance(reply, Exception):
        future.set_exception(reply)
    else:
        future.set_result(reply)
