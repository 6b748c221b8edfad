"""The event loop the gateway and the simulator run on.

uvloop (libuv, in C) when it is installed, which it is on Linux and macOS: the gateway
is CPU-bound per request and per stream event; side by side, uvloop served 16% more
requests a second and spent 7-16% less CPU per relayed event (BENCHMARKS.md 2 (g)).
Windows, where uvloop does not exist, and `BALANCER_EVENT_LOOP=asyncio` get the
standard loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHOICES = ("auto", "uvloop", "asyncio")


def factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's own loop."""
    choice = os.environ.get("BALANCER_EVENT_LOOP", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"BALANCER_EVENT_LOOP={choice!r}: expected one of "
                         f"{', '.join(CHOICES)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError("BALANCER_EVENT_LOOP=uvloop, but uvloop is not installed "
                             "(pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def name() -> str:
    """What `factory()` picks, for the startup log."""
    return "asyncio" if factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on the chosen loop."""
    with asyncio.Runner(loop_factory=factory()) as runner:
        return runner.run(main)
