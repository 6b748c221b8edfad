"""`regions.yaml` -> a typed, validated `Config`.

Checked twice, like envoyproxy/ratelimit: first every key against an allow-list
(a typo must not pass silently), then the values. Every error names the file,
the path of the field (`regions[3].deployments.gpt-4.tpm`) and the reason, and
the whole file is checked before anything is reported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_PATH = "regions.yaml"
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KINDS = ("azure", "openai")
SETTLE_MODES = ("quota", "usage")


class ConfigError(Exception):
    """Every problem found in one config file, each naming file, field and reason."""

    def __init__(self, file: str, problems: list[tuple[str, str]]):
        self.file = file
        self.problems = problems
        lines = [f"{file}: {path or '<root>'}: {reason}" for path, reason in problems]
        super().__init__("\n".join(lines))


class Secret:
    """A string that never shows itself in repr, str, logs or error bodies."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = 8080


@dataclass(frozen=True)
class StoreConfig:
    url: str = "memory://"
    key_prefix: str = "bal"
    cluster: bool = False
    timeout_seconds: float = 0.25  # a slow store must not slow requests: degrade instead
    key_ttl_seconds: int = 3600


@dataclass(frozen=True)
class GatewayConfig:
    max_attempts: int = 3
    deadline_seconds: float = 300.0
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 120.0  # longest silence from an upstream before we give up
    body_timeout_seconds: float = 30.0  # longest a client may take to send its request body
    max_body_bytes: int = 4 * 1024 * 1024
    default_cooldown_seconds: float = 10.0
    circuit_failures: int = 5
    circuit_open_seconds: float = 30.0
    burst_seconds: float = 10.0  # Azure enforces TPM over ~10 s windows
    rpm_burst_seconds: float = 1.0  # ... and RPM over 1 s windows (600 RPM = 10 per second)
    settle: str = "quota"
    time_scale: float = 1.0  # >1 compresses time for simulations: 10 makes a minute last 6 s
    expose_regions: bool = True
    reload_poll_seconds: float = 2.0  # how often regions.yaml is checked for changes; 0: never
    drain_timeout_seconds: float = 30.0  # on SIGTERM, how long in-flight requests may finish
    shutdown_delay_seconds: float = 0.0  # on SIGTERM, readiness fails this long before draining


@dataclass(frozen=True)
class LearnedCapacity:
    """Shrink a region's effective capacity when it shows less than configured (a 429
    implying a slower refill than configured, or fewer remaining tokens reported than
    the bucket holds), and recover gradually when the evidence stops (AIMD)."""

    enabled: bool = True
    min_factor: float = 0.2  # never believe a region has less than this share of its TPM
    recovery_per_minute: float = 0.1  # share of capacity regained per minute without evidence
    evidence_margin: float = 0.25  # share of the bucket: a remaining-tokens report is
    # evidence only when it is this much (plus the request's own cost) below the bucket.
    # Smaller gaps are timing noise between replicas and the region, not a hidden consumer


@dataclass(frozen=True)
class LatencyWeighting:
    """Weigh regions by (fastest latency per output token / theirs) ** strength, so a
    region that slows down gets less traffic before it starts answering 429."""

    enabled: bool = True  # BENCHMARKS.md section 3 (a): p90 -25% when a region slows down
    strength: float = 1.0


@dataclass(frozen=True)
class AdmissionQueue:
    """When no region can take a request now, let it wait for capacity (refill or the
    end of a cooldown) up to a deadline instead of answering 429 at once."""

    enabled: bool = True
    max_wait_ms: int = 30_000  # cap on x-balancer-max-wait-ms
    default_wait_ms: Mapping[str, int] = field(default_factory=lambda: {
        "chat/completions": 0, "completions": 0, "embeddings": 0})
    classes: Mapping[str, int] = field(default_factory=lambda: {"low": 0, "normal": 1,
                                                                 "high": 2})
    default_class: str = "normal"
    priority_header: bool = False  # honour x-balancer-priority from clients
    class_head_start_seconds: float = 10.0  # each class above another counts as having
    # arrived this much earlier: bounded, so a lower class waiting longer still goes first


@dataclass(frozen=True)
class Deployment:
    model: str
    deployment: str
    tpm: int
    rpm: int
    weight: float = 1.0
    default_max_tokens: int = 1024


@dataclass(frozen=True)
class Region:
    name: str
    kind: str
    endpoint: str
    api_key: Secret | None
    api_version: str | None
    priority: int
    deployments: Mapping[str, Deployment]

    def __repr__(self) -> str:  # endpoints can be private; keys are Secrets anyway
        return f"Region(name={self.name!r}, kind={self.kind!r}, priority={self.priority})"


@dataclass(frozen=True)
class Target:
    """One place a model can be served: a deployment in a region."""

    region: Region
    deployment: Deployment

    @property
    def priority(self) -> int:
        return self.region.priority


@dataclass(frozen=True)
class Config:
    listen: Listen = field(default_factory=Listen)
    store: StoreConfig = field(default_factory=StoreConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    regions: tuple[Region, ...] = ()
    learned_capacity: LearnedCapacity = field(default_factory=LearnedCapacity)
    latency_weighting: LatencyWeighting = field(default_factory=LatencyWeighting)
    admission_queue: AdmissionQueue = field(default_factory=AdmissionQueue)
    source: str = "<defaults>"

    @property
    def models(self) -> dict[str, tuple[Target, ...]]:
        out: dict[str, list[Target]] = {}
        for region in self.regions:
            for model, dep in region.deployments.items():
                out.setdefault(model, []).append(Target(region, dep))
        return {m: tuple(t) for m, t in out.items()}


# --------------------------------------------------------------------------- loading


def config_path(explicit: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    return explicit or env.get("BALANCER_CONFIG") or DEFAULT_PATH


def load(
    path: str | os.PathLike[str],
    env: Mapping[str, str] = os.environ,
    *,
    simulate: bool = False,
) -> Config:
    """Read and validate a config file. `simulate` tolerates unset endpoint and key
    variables, because `serve --simulate` replaces them with local simulated regions."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, [("", f"cannot read file: {exc.strerror or exc}")]) from None
    return parse(text, file, env, simulate=simulate)


def parse(
    text: str,
    file: str = "<string>",
    env: Mapping[str, str] = os.environ,
    *,
    simulate: bool = False,
) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(file, [(where, f"invalid YAML: {reason}")]) from None
    v = _Validator(env, simulate)
    config = v.config(raw, file)
    redis_url = env.get("REDIS_URL")
    if redis_url:
        config = replace(config, store=replace(config.store, url=redis_url))
        v.store_url(redis_url, "REDIS_URL")
    if v.problems:
        raise ConfigError(file, v.problems)
    return config


class _Validator:
    """Walks the raw YAML, collecting every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str], simulate: bool):
        self.env = env
        self.simulate = simulate
        self.problems: list[tuple[str, str]] = []

    def fail(self, path: str, reason: str) -> None:
        self.problems.append((path, reason))

    # -- scalars -----------------------------------------------------------------

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, got {_kind(value)}")
            return {}
        for key in value:
            if not isinstance(key, str):
                self.fail(path, f"keys must be strings, got {key!r}")
            elif key not in allowed:
                hint = _closest(key, allowed)
                suffix = f" (did you mean {hint!r}?)" if hint else ""
                self.fail(_join(path, key), "unknown key" + suffix)
        return value

    def string(self, value: Any, path: str, *, required: bool = False, tolerate_env: bool = False
               ) -> str | None:
        if value is None:
            if required:
                self.fail(path, "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.fail(path, f"must be a string, got {_kind(value)}")
            return None
        return self.expand(str(value), path, tolerate_env)

    def expand(self, text: str, path: str, tolerate_missing: bool) -> str | None:
        missing: list[str] = []

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            missing.append(name)
            return ""

        out = ENV_REF.sub(sub, text)
        if missing:
            if tolerate_missing:
                return None
            for name in missing:
                self.fail(path, f"environment variable {name} is not set")
            return None
        return out

    def number(self, value: Any, path: str, default: float, *, minimum: float = 0.0,
               exclusive: bool = False, integer: bool = False) -> Any:
        if value is None:
            return default
        if isinstance(value, str):
            value = self.expand(value, path, False)
            try:
                value = float(value) if value is not None else None
            except ValueError:
                self.fail(path, f"must be a number, got {value!r}")
                return default
            if value is None:
                return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"must be a number, got {_kind(value)}")
            return default
        if integer and value != int(value):
            self.fail(path, f"must be a whole number, got {value}")
            return default
        if value < minimum or (exclusive and value == minimum):
            self.fail(path, f"must be {'>' if exclusive else '>='} {minimum:g}, got {value}")
            return default
        return int(value) if integer else float(value)

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {_kind(value)}")
            return default
        return value

    def choice(self, value: Any, path: str, options: tuple[str, ...], default: str) -> str:
        text = self.string(value, path)
        if text is None:
            return default
        if text not in options:
            self.fail(path, f"must be one of {', '.join(options)}, got {text!r}")
            return default
        return text

    # -- sections ----------------------------------------------------------------

    def config(self, raw: Any, file: str) -> Config:
        top = self.mapping(raw, "", {"listen", "store", "gateway", "regions",
                                     "learned_capacity", "latency_weighting",
                                     "admission_queue"})
        if raw is None:
            self.fail("", "the file is empty")
        return Config(
            listen=self.listen(top.get("listen"), "listen"),
            store=self.store(top.get("store"), "store"),
            gateway=self.gateway(top.get("gateway"), "gateway"),
            regions=self.regions(top.get("regions"), "regions"),
            learned_capacity=self.learned(top.get("learned_capacity"), "learned_capacity"),
            latency_weighting=self.latency(top.get("latency_weighting"), "latency_weighting"),
            admission_queue=self.queue(top.get("admission_queue"), "admission_queue"),
            source=file,
        )

    def queue(self, raw: Any, path: str) -> AdmissionQueue:
        d = AdmissionQueue()
        m = self.mapping(raw, path, set(AdmissionQueue.__dataclass_fields__))
        waits = dict(d.default_wait_ms)
        p = _join(path, "default_wait_ms")
        for op, value in self.mapping(m.get("default_wait_ms"), p, set(waits)).items():
            waits[op] = self.number(value, _join(p, op), 0, integer=True)
        classes = dict(d.classes)
        if m.get("classes") is not None:
            p = _join(path, "classes")
            raw_classes = m.get("classes")
            if not isinstance(raw_classes, dict) or not raw_classes:
                self.fail(p, "must be a non-empty mapping of class name to rank")
            else:
                classes = {}
                for name, rank in raw_classes.items():
                    if not isinstance(name, str) or not NAME.match(name):
                        self.fail(_join(p, str(name)), "class names must be letters, digits, "
                                                        "'.', '_' or '-'")
                        continue
                    classes[name] = self.number(rank, _join(p, name), 0, integer=True)
        default_class = self.string(m.get("default_class"), _join(path, "default_class")) \
            or d.default_class
        if default_class not in classes:
            self.fail(_join(path, "default_class"),
                      f"must be one of the classes ({', '.join(classes)}), got {default_class!r}")
        return AdmissionQueue(
            enabled=self.boolean(m.get("enabled"), _join(path, "enabled"), d.enabled),
            max_wait_ms=self.number(m.get("max_wait_ms"), _join(path, "max_wait_ms"),
                                    d.max_wait_ms, integer=True),
            default_wait_ms=waits,
            classes=classes,
            default_class=default_class,
            priority_header=self.boolean(m.get("priority_header"),
                                         _join(path, "priority_header"), d.priority_header),
            class_head_start_seconds=self.number(
                m.get("class_head_start_seconds"), _join(path, "class_head_start_seconds"),
                d.class_head_start_seconds),
        )

    def learned(self, raw: Any, path: str) -> LearnedCapacity:
        d = LearnedCapacity()
        m = self.mapping(raw, path, set(LearnedCapacity.__dataclass_fields__))
        min_factor = self.number(m.get("min_factor"), _join(path, "min_factor"), d.min_factor,
                                 exclusive=True)
        if min_factor > 1:
            self.fail(_join(path, "min_factor"), f"must be <= 1, got {min_factor}")
        return LearnedCapacity(
            enabled=self.boolean(m.get("enabled"), _join(path, "enabled"), d.enabled),
            min_factor=min(min_factor, 1.0),
            recovery_per_minute=self.number(m.get("recovery_per_minute"),
                                            _join(path, "recovery_per_minute"),
                                            d.recovery_per_minute),
            evidence_margin=self.number(m.get("evidence_margin"), _join(path, "evidence_margin"),
                                        d.evidence_margin),
        )

    def latency(self, raw: Any, path: str) -> LatencyWeighting:
        d = LatencyWeighting()
        m = self.mapping(raw, path, set(LatencyWeighting.__dataclass_fields__))
        return LatencyWeighting(
            enabled=self.boolean(m.get("enabled"), _join(path, "enabled"), d.enabled),
            strength=self.number(m.get("strength"), _join(path, "strength"), d.strength,
                                 exclusive=True),
        )

    def listen(self, raw: Any, path: str) -> Listen:
        m = self.mapping(raw, path, {"host", "port"})
        d = Listen()
        return Listen(
            host=self.string(m.get("host"), _join(path, "host")) or d.host,
            port=self.number(m.get("port"), _join(path, "port"), d.port, integer=True),
        )

    def store(self, raw: Any, path: str) -> StoreConfig:
        m = self.mapping(raw, path, {"url", "key_prefix", "cluster", "timeout_seconds",
                                     "key_ttl_seconds"})
        d = StoreConfig()
        url = self.string(m.get("url"), _join(path, "url")) or d.url
        self.store_url(url, _join(path, "url"))
        prefix = self.string(m.get("key_prefix"), _join(path, "key_prefix")) or d.key_prefix
        if not NAME.match(prefix):
            self.fail(_join(path, "key_prefix"), "must be letters, digits, '.', '_' or '-'")
        return StoreConfig(
            url=url,
            key_prefix=prefix,
            cluster=self.boolean(m.get("cluster"), _join(path, "cluster"), d.cluster),
            timeout_seconds=self.number(m.get("timeout_seconds"), _join(path, "timeout_seconds"),
                                        d.timeout_seconds, exclusive=True),
            key_ttl_seconds=self.number(m.get("key_ttl_seconds"), _join(path, "key_ttl_seconds"),
                                        d.key_ttl_seconds, minimum=1, integer=True),
        )

    def store_url(self, url: str, path: str) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("memory", "redis", "rediss", "redis+cluster", "rediss+cluster"):
            self.fail(path, f"unsupported store URL scheme {scheme!r} "
                            "(use memory://, redis://, rediss:// or redis+cluster://)")

    def gateway(self, raw: Any, path: str) -> GatewayConfig:
        d = GatewayConfig()
        m = self.mapping(raw, path, set(GatewayConfig.__dataclass_fields__))
        num: Callable[..., Any] = lambda key, **kw: self.number(  # noqa: E731
            m.get(key), _join(path, key), getattr(d, key), **kw)
        return GatewayConfig(
            max_attempts=num("max_attempts", minimum=1, integer=True),
            deadline_seconds=num("deadline_seconds", exclusive=True),
            connect_timeout_seconds=num("connect_timeout_seconds", exclusive=True),
            read_timeout_seconds=num("read_timeout_seconds", exclusive=True),
            body_timeout_seconds=num("body_timeout_seconds", exclusive=True),
            max_body_bytes=num("max_body_bytes", minimum=1024, integer=True),
            default_cooldown_seconds=num("default_cooldown_seconds"),
            circuit_failures=num("circuit_failures", minimum=1, integer=True),
            circuit_open_seconds=num("circuit_open_seconds"),
            burst_seconds=num("burst_seconds", exclusive=True),
            rpm_burst_seconds=num("rpm_burst_seconds", exclusive=True),
            settle=self.choice(m.get("settle"), _join(path, "settle"), SETTLE_MODES, d.settle),
            time_scale=num("time_scale", exclusive=True),
            expose_regions=self.boolean(m.get("expose_regions"), _join(path, "expose_regions"),
                                        d.expose_regions),
            reload_poll_seconds=num("reload_poll_seconds"),
            drain_timeout_seconds=num("drain_timeout_seconds"),
            shutdown_delay_seconds=num("shutdown_delay_seconds"),
        )

    def regions(self, raw: Any, path: str) -> tuple[Region, ...]:
        if raw is None:
            self.fail(path, "is required: list at least one region")
            return ()
        if not isinstance(raw, list):
            self.fail(path, f"must be a list, got {_kind(raw)}")
            return ()
        if not raw:
            self.fail(path, "must list at least one region")
        out: list[Region] = []
        seen: set[str] = set()
        for i, item in enumerate(raw):
            region = self.region(item, f"{path}[{i}]")
            if region is None:
                continue
            if region.name in seen:
                self.fail(f"{path}[{i}].name", f"duplicate region name {region.name!r}")
            seen.add(region.name)
            out.append(region)
        return tuple(out)

    def region(self, raw: Any, path: str) -> Region | None:
        m = self.mapping(raw, path, {"name", "kind", "endpoint", "api_key", "api_version",
                                     "priority", "deployments"})
        if not m:
            if raw is not None and isinstance(raw, dict):
                self.fail(path, "is empty")
            return None
        name = self.string(m.get("name"), _join(path, "name"), required=True) or "?"
        if name != "?" and not NAME.match(name):
            self.fail(_join(path, "name"), "must be 1-64 letters, digits, '.', '_' or '-'")
        kind = self.choice(m.get("kind"), _join(path, "kind"), KINDS, "azure")
        endpoint = self.string(m.get("endpoint"), _join(path, "endpoint"), required=True,
                               tolerate_env=self.simulate)
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                self.fail(_join(path, "endpoint"), f"must be an http(s) URL, got {endpoint!r}")
        elif self.simulate:
            endpoint = "http://simulated.invalid"
        key = self.string(m.get("api_key"), _join(path, "api_key"), tolerate_env=self.simulate)
        api_version = self.string(m.get("api_version"), _join(path, "api_version"))
        if kind == "azure" and api_version is None:
            self.fail(_join(path, "api_version"), "is required for kind azure")
        priority = self.number(m.get("priority"), _join(path, "priority"), 0, integer=True)
        deployments = self.deployments(m.get("deployments"), _join(path, "deployments"))
        return Region(
            name=name,
            kind=kind,
            endpoint=(endpoint or "").rstrip("/"),
            api_key=Secret(key) if key else None,
            api_version=api_version,
            priority=priority,
            deployments=deployments,
        )

    def deployments(self, raw: Any, path: str) -> dict[str, Deployment]:
        if raw is None:
            self.fail(path, "is required: map at least one model to a deployment")
            return {}
        if not isinstance(raw, dict) or not raw:
            self.fail(path, "must be a non-empty mapping of model name to deployment")
            return {}
        out = {}
        for model, spec in raw.items():
            p = _join(path, str(model))
            if not isinstance(model, str) or not NAME.match(model):
                self.fail(p, "model names must be 1-64 letters, digits, '.', '_' or '-'")
                continue
            m = self.mapping(spec, p, {"deployment", "tpm", "rpm", "weight", "default_max_tokens"})
            tpm = self.number(m.get("tpm"), _join(p, "tpm"), 0, minimum=1, integer=True)
            if m.get("tpm") is None:
                self.fail(_join(p, "tpm"), "is required")
            rpm = self.number(m.get("rpm"), _join(p, "rpm"), max(1, tpm * 6 // 1000), minimum=1,
                              integer=True)
            dep_name = self.string(m.get("deployment"), _join(p, "deployment")) or model
            if not NAME.match(dep_name):
                self.fail(_join(p, "deployment"), "must be 1-64 letters, digits, '.', '_' or '-'")
            out[model] = Deployment(
                model=model,
                deployment=dep_name,
                tpm=tpm,
                rpm=rpm,
                weight=self.number(m.get("weight"), _join(p, "weight"), 1.0, exclusive=True),
                default_max_tokens=self.number(m.get("default_max_tokens"),
                                               _join(p, "default_max_tokens"), 1024, minimum=1,
                                               integer=True),
            )
        return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "nothing"}.get(type(value),
                                                                             type(value).__name__)


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return match[0] if match else None
