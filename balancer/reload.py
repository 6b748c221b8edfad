"""Hot reload of regions.yaml: on SIGHUP, and when the file's contents change.

New weights, quotas and regions apply to requests that arrive after the reload;
a request in flight keeps the config it started with (it holds its own
references). An invalid file is refused: the old config stays, and the error is
logged and counted. Contents are compared, not mtimes, because Kubernetes swaps
ConfigMap files through symlinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from balancer.config import Config, ConfigError
from balancer.gateway.runtime import RUNTIME

log = logging.getLogger("balancer.reload")

Loader = Callable[[], Config]


class Reloader:
    def __init__(self, app: web.Application, path: str, load: Loader):
        self.rt = app[RUNTIME]
        self.path = Path(path)
        self.load = load
        self.digest = self._digest()
        self._lock = asyncio.Lock()

    def _digest(self) -> bytes | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None  # mid-swap or removed: try again at the next poll

    async def reload(self, trigger: str) -> bool:
        async with self._lock:
            metrics = self.rt.metrics
            self.digest = self._digest()
            try:
                new = self.load()
            except ConfigError as exc:
                metrics.config_reloads.labels("failure").inc()
                log.error("config reload (%s) refused, keeping the running config:\n%s",
                          trigger, exc)
                return False
            old = self.rt.config
            for section in ("listen", "store"):
                if getattr(new, section) != getattr(old, section):
                    log.warning("config reload (%s): '%s' changes need a restart; ignored",
                                trigger, section)
            self.rt.apply(new)
            metrics.config_reloads.labels("success").inc()
            log.info("config reloaded (%s): %d regions, models %s", trigger, len(new.regions),
                     ", ".join(sorted(new.models)))
            return True

    async def watch(self) -> None:
        while True:
            interval = self.rt.config.gateway.reload_poll_seconds
            await asyncio.sleep(interval if interval > 0 else 5.0)
            if interval <= 0:
                continue
            digest = self._digest()
            if digest is not None and digest != self.digest:
                await self.reload("file changed")


RELOADER = web.AppKey("reloader", Reloader)


def install(app: web.Application, path: str, load: Loader) -> None:
    """Give `app` a reloader for `path`, with its file watch as a cleanup context."""

    async def watching(app: web.Application) -> AsyncIterator[None]:
        reloader = Reloader(app, path, load)
        app[RELOADER] = reloader
        task = asyncio.create_task(reloader.watch())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(watching)
