"""What every request needs, kept on the app: the config in force, its routing table,
the keys it accepts, the store, metrics, the upstream session, and the per-request
access-log record."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from balancer.capacity.base import CapacityStore
from balancer.config import Config, Target
from balancer.config.model import ClientBudget
from balancer.entra import EntraAuth
from balancer.latency import LatencyPools
from balancer.logs import AccessLog
from balancer.metrics import Metrics
from balancer.policy import Limits

access_log = logging.getLogger("balancer.access")
log = logging.getLogger("balancer")

# Request ids and queue tickets: 32 hex digits, unique per process by a counter and across
# processes by a random prefix, without uuid4's os.urandom system call per request.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


@dataclass(frozen=True)
class ModelRoute:
    """Where one model can go: its targets and their store limits, index-aligned."""

    targets: Mapping[str, Target]
    limits: tuple[Limits, ...]
    default_max_tokens: int
    provisioned: frozenset[str] = frozenset()  # regions where the model is a PTU deployment

    def only(self, region: str) -> ModelRoute | None:
        """The route narrowed to one region (where a stored response lives), or None
        when the model has no deployment there."""
        target = self.targets.get(region)
        if target is None:
            return None
        return ModelRoute({region: target}, tuple(x for x in self.limits if x.region == region),
                          self.default_max_tokens, self.provisioned)


def tier(target: Target) -> int:
    """The priority tier the store sees: within a configured priority, provisioned (PTU)
    deployments form a tier before standard ones, so policy.pick fills them first and
    standard deployments take only what they cannot (PTU is prepaid: unused, it is lost).
    Order-preserving for any integer priority; GET /regions shows the configured one."""
    return target.region.priority * 2 + (0 if target.deployment.provisioned else 1)


def limits_for(target: Target, config: Config) -> Limits:
    gw, learn, lat = config.gateway, config.learned_capacity, config.latency_weighting
    dep = target.deployment
    per_second_tpm, per_second_rpm = dep.tpm / 60.0, dep.rpm / 60.0
    return Limits(
        region=target.region.name,
        tokens_capacity=per_second_tpm * gw.burst_seconds,
        tokens_rate=per_second_tpm * gw.time_scale,
        requests_capacity=max(1.0, per_second_rpm * gw.rpm_burst_seconds),
        requests_rate=per_second_rpm * gw.time_scale,
        weight=dep.weight,
        priority=tier(target),
        min_factor=learn.min_factor if learn.enabled else 1.0,
        recovery_rate=learn.recovery_per_minute / 60.0 * gw.time_scale if learn.enabled else 0.0,
        latency_weight=lat.strength if lat.enabled else 0.0,
    )


def build_routes(config: Config) -> dict[str, ModelRoute]:
    routes = {}
    for model, targets in config.models.items():
        routes[model] = ModelRoute(
            targets={t.region.name: t for t in targets},
            limits=tuple(limits_for(t, config) for t in targets),
            default_max_tokens=max(t.deployment.default_max_tokens for t in targets),
            provisioned=frozenset(t.region.name for t in targets if t.deployment.provisioned),
        )
    return routes


@dataclass(frozen=True)
class Tenant:
    """Who a request is from: a client of regions.yaml's `clients`, the N-th key of
    BALANCER_API_KEYS (`key-N`), or anyone when no key is configured (ANONYMOUS)."""

    name: str  # metric label: only config-derived names, never request input
    key_class: str | None = None  # admission-queue class of the key, if it names one
    weight: float = 1.0  # share of the pool when it runs short
    budgets: Mapping[str, ClientBudget] = field(default_factory=dict, hash=False)


ANONYMOUS = Tenant("anonymous")


@dataclass(frozen=True)
class KeyTable:
    """The keys in force, as SHA-256 digests: client keys with their tenants
    (index-aligned: config clients first, then BALANCER_API_KEYS), and admin keys."""

    digests: tuple[bytes, ...] = ()
    tenants: tuple[Tenant, ...] = ()
    admin: tuple[bytes, ...] = ()

    def __repr__(self) -> str:  # names, not digests
        return (f"KeyTable(clients={[t.name for t in self.tenants]}, "
                f"admin_keys={len(self.admin)})")


def env_keys(env: Mapping[str, str]) -> list[tuple[bytes, str | None]]:
    """BALANCER_API_KEYS: comma-separated keys, each optionally `KEY#class` to give its
    requests a priority class of the admission queue."""
    out = []
    for entry in env.get("BALANCER_API_KEYS", "").split(","):
        key, _, cls = entry.strip().partition("#")
        if key:
            out.append((key.encode(), cls or None))
    return out


def admin_keys(env: Mapping[str, str]) -> tuple[bytes, ...]:
    """BALANCER_ADMIN_KEYS: comma-separated keys for /regions, /metrics and /clients."""
    keys = (k.strip() for k in env.get("BALANCER_ADMIN_KEYS", "").split(","))
    return digests(tuple(k.encode() for k in keys if k))


def digests(keys: tuple[bytes, ...]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(k).digest() for k in keys)


def key_table(config: Config, env: Mapping[str, str]) -> KeyTable:
    """The keys of `config`'s clients and of the environment, hashed once."""
    hashed: list[bytes] = []
    tenants: list[Tenant] = []
    for client in config.clients:
        if client.key is not None:
            digest = hashlib.sha256(client.key.reveal().encode()).digest()
        elif client.key_sha256 is not None:
            digest = bytes.fromhex(client.key_sha256)
        else:  # config.load refuses it; a hand-built Config might not
            continue
        hashed.append(digest)
        tenants.append(Tenant(client.name, client.priority_class, client.weight,
                              client.budgets))
    listed = env_keys(env)
    for n, (key, cls) in enumerate(listed, start=1):
        digest = hashlib.sha256(key).digest()
        if digest in hashed:  # config.load refuses duplicates among clients
            first = tenants[hashed.index(digest)].name
            log.warning("key-%d of BALANCER_API_KEYS is also %s's key: %s's settings apply",
                        n, first, first)
        hashed.append(digest)
        tenants.append(Tenant(f"key-{n}", cls))
    return KeyTable(tuple(hashed), tuple(tenants), admin_keys(env))


@dataclass
class Runtime:
    """Everything a request needs. `config` and `routes` are replaced together on
    reload; a request reads them once, so reloads never change a request midway."""

    config: Config
    store: CapacityStore
    metrics: Metrics
    # Where BALANCER_API_KEYS and BALANCER_ADMIN_KEYS are read, at start and on reload.
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    keys: KeyTable = field(default_factory=KeyTable)  # built from config and env
    session: aiohttp.ClientSession | None = None
    auth: EntraAuth = field(default_factory=EntraAuth)  # tokens of `auth: entra` regions
    routes: dict[str, ModelRoute] = field(default_factory=dict)
    draining: bool = False
    in_flight: int = 0
    children: dict[tuple[int, tuple[str, ...]], Any] = field(default_factory=dict)
    latency: LatencyPools = field(default_factory=LatencyPools)
    access: AccessLog = field(default_factory=lambda: AccessLog(access_log))

    def __post_init__(self) -> None:
        self.routes = build_routes(self.config)
        self.keys = key_table(self.config, self.env)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: prometheus_client's labels() converts,
        validates and locks on every call, several per request. Counters and histograms
        only: gauges' children are cleared on scrape. Labels are bounded (configured
        models and regions, statuses), and so is the cache."""
        key = (id(metric), labels)
        found = self.children.get(key)
        if found is None:
            if len(self.children) > 10_000:
                self.children.clear()
            found = self.children[key] = metric.labels(*labels)
        return found

    def sku(self, model: str, region: str) -> str:
        """The deployment's `sku` (a metric label), from the routing table in force."""
        route = self.routes.get(model)
        return "provisioned" if route is not None and region in route.provisioned \
            else "standard"

    def apply(self, config: Config) -> None:
        """Switch to a new config (a reload): routes, keys (the config's clients and the
        environment's keys, read again) and config at once, no await between."""
        routes, keys = build_routes(config), key_table(config, self.env)
        self.routes, self.keys, self.config = routes, keys, config


RUNTIME = web.AppKey("runtime", Runtime)


@dataclass
class Record:
    """One structured access-log line per request (no secrets, no bodies)."""

    request_id: str
    model: str | None = None
    operation: str = "none"  # metric label: an operation's name, or an action on a stored one
    region: str | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    client: str | None = None  # the client's name (a metric label: config names only)
    headers: dict[str, str] | None = None  # its x-ratelimit-* headers, added at prepare


RECORD = web.RequestKey("record", Record)  # the request's access-log record
