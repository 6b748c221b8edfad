"""The gateway: an aiohttp app. `proxy` is the request path read top to bottom; each
step it delegates is a module of its own (see ARCHITECTURE.md)."""

from balancer.gateway.app import create_app
from balancer.gateway.runtime import RUNTIME, Runtime

__all__ = ["RUNTIME", "Runtime", "create_app"]
