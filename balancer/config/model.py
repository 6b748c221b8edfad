"""The typed configuration. Each setting is one field declaring its type, default, doc
and rules (see `schema`); fields are read, and their problems reported, in declaration
order (kept from the hand-written validator, so `balancer check` output is unchanged)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from balancer.config.schema import NAME, Check, setting
from balancer.config.store import STORE_SCHEMES, StoreConfig

__all__ = ["STORE_SCHEMES", "StoreConfig"]  # re-exported: the store's section lives in store.py
from balancer.operations import NAMES as OPERATION_NAMES

KINDS = ("azure", "openai")
# key: the region's api_key; entra: a Microsoft Entra ID bearer token (balancer.entra),
# for resources with key auth disabled (disableLocalAuth).
AUTH_MODES = ("key", "entra")
SETTLE_MODES = ("quota", "usage")
# standard: pay-as-you-go quota (TPM/RPM); provisioned: prepaid throughput units (PTU),
# filled first within a priority tier, standard ones taking only the excess.
SKUS = ("standard", "provisioned")


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


# -- checks: fn(value, the fields read before it) -> reason or None ----------------------


def matches(reason: str) -> Check:
    return lambda value, _: None if NAME.match(value) else reason


def http_url(url: str, _: Any) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"must be an http(s) URL, got {url!r}"
    return None


# Azure's api-version: "v1" (the /openai/v1/ routes, Azure's recommended surface since
# August 2025) or a dated version. [0-9], not \d: \d matches non-ASCII digits too.
API_VERSION = re.compile(r"v1|[0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?")


def azure_api_version(version: str | None, region: Mapping[str, Any]) -> str | None:
    if region["kind"] != "azure":
        return None
    if version is None:
        return "is required for kind azure (v1, or a dated version such as 2024-10-21)"
    if not API_VERSION.fullmatch(version):
        return f"must be v1 or a date YYYY-MM-DD[-preview], got {version!r}"
    return None


def entra_only_for_azure(auth: str, region: Mapping[str, Any]) -> str | None:
    if auth == "entra" and region["kind"] != "azure":
        return "entra is only for kind azure (kind openai takes an api_key)"
    return None


def no_key_with_entra(key: Secret | None, region: Mapping[str, Any]) -> str | None:
    if key is not None and region["auth"] == "entra":
        return "remove api_key: entra regions send a bearer token"
    return None


# A managed identity's client ID is a GUID; a typo should fail here, not at the first token.
GUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def entra_client(client_id: str | None, region: Mapping[str, Any]) -> str | None:
    if not client_id:  # unset, or blank (`${VAR:-}`): the default identity
        return None
    if region["auth"] != "entra":
        return "is only for auth: entra"
    if not GUID.fullmatch(client_id):
        return f"must be a client ID (a GUID), got {client_id!r}"
    return None


def one_of_the_classes(name: str, queue: Mapping[str, Any]) -> str | None:
    classes = queue["classes"]
    return None if name in classes else \
        f"must be one of the classes ({', '.join(classes)}), got {name!r}"


def rpm_from_tpm(deployment: Mapping[str, Any]) -> int:
    return max(1, deployment["tpm"] * 6 // 1000)  # Azure grants 6 RPM per 1000 TPM


NAME_REASON = "must be 1-64 letters, digits, '.', '_' or '-'"

SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def sha256_hex(digest: str | None, _: Any) -> str | None:
    if digest is not None and not SHA256_HEX.fullmatch(digest):
        return "must be 64 hex digits (the SHA-256 of the key, e.g. from sha256sum)"
    return None


def one_key(key: Secret | None, client: Mapping[str, Any]) -> str | None:
    """A client names its key, or its key's SHA-256: exactly one of them."""
    if key is not None and client["key_sha256"] is not None:
        return "give key or key_sha256, not both"
    if key is None and client["key_sha256"] is None:
        return ("is required, and must not be empty: the client's API key (usually "
                "${VAR}), or key_sha256")
    return None


def below_half(headroom: float, _: Any) -> str | None:
    return None if headroom < 0.5 else f"must be < 0.5, got {headroom}"


# -- sections ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Listen:
    host: str = setting("0.0.0.0", "address to listen on")
    port: int = setting(8080, "TCP port to listen on")


@dataclass(frozen=True)
class GatewayConfig:
    max_attempts: int = setting(3, "regions tried per request, before any byte reaches "
                                   "the client", minimum=1)
    deadline_seconds: float = setting(300.0, "time budget for those attempts", exclusive=True)
    connect_timeout_seconds: float = setting(5.0, "connecting to a region", exclusive=True)
    read_timeout_seconds: float = setting(
        120.0, "longest silence from an upstream before we give up", exclusive=True)
    body_timeout_seconds: float = setting(
        30.0, "longest a client may take to send its request body", exclusive=True)
    max_body_bytes: int = setting(4 * 1024 * 1024, "larger request bodies get 413",
                                  minimum=1024)
    # Above the largest legitimate answer: 2,048 embeddings of 3,072 dimensions in base64
    # (the SDKs' default encoding) come to ~34 MB.
    max_upstream_body_bytes: int = setting(
        64 * 1024 * 1024, "larger answers from a region (decompressed; a stream's bytes "
                          "in all) are cut: 502, or an error event", minimum=65536)
    # aiohttp's keepalive_timeout: from a connection's start, or the end of its previous
    # answer, to its next complete request head, so it also closes idle keep-alive
    # connections; above the 60 s idle timeouts of common proxies pooling to the gateway.
    header_timeout_seconds: float = setting(
        75.0, "longest a connection may take to send a request's headers (or stay idle "
              "between requests); read at start", exclusive=True)
    default_cooldown_seconds: float = setting(10.0, "cooldown after a 429 naming no wait")
    circuit_failures: int = setting(5, "consecutive 5xx/timeouts that open a circuit",
                                    minimum=1)
    circuit_open_seconds: float = setting(30.0, "how long an open circuit stays open")
    burst_seconds: float = setting(  # Azure enforces TPM over ~10 s windows
        10.0, "token bucket size, in seconds of TPM", exclusive=True)
    rpm_burst_seconds: float = setting(  # ... and RPM over 1 s windows (600 RPM = 10 per s)
        1.0, "request bucket size, in seconds of RPM", exclusive=True)
    settle: str = setting("quota", "quota: charge what Azure's quota counter charges; "
                                   "usage: the tokens really used", choices=SETTLE_MODES)
    time_scale: float = setting(  # 10 makes a minute last 6 s
        1.0, ">1 compresses time for simulations", exclusive=True)
    expose_regions: bool = setting(True, "serve GET /regions")
    reload_poll_seconds: float = setting(2.0, "how often regions.yaml is checked for "
                                              "changes; 0: never")
    drain_timeout_seconds: float = setting(30.0, "on SIGTERM, how long in-flight "
                                                 "requests may finish")
    shutdown_delay_seconds: float = setting(0.0, "on SIGTERM, how long readiness fails "
                                                 "before draining")


@dataclass(frozen=True)
class LearnedCapacity:
    """Shrink a region's effective capacity when it shows less than configured (a 429
    implying a slower refill than configured, fewer tokens admitted between two 429s
    than its configured rate refills, or fewer remaining tokens reported than the bucket
    holds), and recover gradually when the evidence stops (AIMD)."""

    min_factor: float = setting(0.2, "never believe a region has less than this share "
                                     "of its TPM", exclusive=True, maximum=1)
    enabled: bool = setting(True, "false: always trust the configured TPM")
    recovery_per_minute: float = setting(
        0.1, "share of capacity regained per minute without evidence")
    # A remaining-tokens report is evidence only when it is this much (plus the request's
    # own cost) below the bucket: smaller gaps are timing noise between replicas and the
    # region, not a hidden consumer.
    evidence_margin: float = setting(0.25, "share of the bucket")


@dataclass(frozen=True)
class LatencyWeighting:
    """Weigh regions by (fastest latency per output token / theirs) ** strength, so a
    region that slows down gets less traffic before it starts answering 429."""

    enabled: bool = setting(  # BENCHMARKS.md section 3 (a): p90 -25% when a region slows
        True, "false: weigh by capacity only")
    strength: float = setting(1.0, "exponent of the latency ratio", exclusive=True)


@dataclass(frozen=True)
class AdmissionQueue:
    """When no region can take a request now, let it wait for capacity (refill or the
    end of a cooldown) up to a deadline instead of answering 429 at once."""

    default_wait_ms: Mapping[str, int] = setting(
        doc="per route, when the client sends no x-balancer-max-wait-ms", fixed_keys=True,
        factory=lambda: dict.fromkeys(OPERATION_NAMES, 0))  # one key per API operation
    classes: Mapping[str, int] = setting(
        doc="priority class -> rank (higher goes first)",
        factory=lambda: {"low": 0, "normal": 1, "high": 2},
        non_empty="must be a non-empty mapping of class name to rank",
        key_reason="class names must be letters, digits, '.', '_' or '-'")
    default_class: str = setting("normal", "class of requests that name none",
                                 check=one_of_the_classes)
    enabled: bool = setting(True, "false: answer 429 at once")
    max_wait_ms: int = setting(30_000, "cap on x-balancer-max-wait-ms")
    priority_header: bool = setting(False, "honour x-balancer-priority from clients")
    # Bounded, so a lower class waiting longer still goes first: no starvation.
    class_head_start_seconds: float = setting(
        10.0, "each class above another counts as having arrived this much earlier")


@dataclass(frozen=True)
class Responses:
    """The Responses API stores each response in the region that created it; follow-ups
    naming its id go there (balancer.gateway.affinity)."""

    # Azure and OpenAI keep stored responses for 30 days.
    affinity_ttl_seconds: int = setting(30 * 86400, "how long the gateway remembers which "
                                        "region holds a response", minimum=60)


@dataclass(frozen=True)
class Deployment:
    model: str = setting(doc="the model name: its key under `deployments`", internal=True)
    tpm: int = setting(doc="tokens per minute", required=True, fallback=0, minimum=1)
    rpm: int = setting(doc="requests per minute (default tpm*6/1000)",
                       default_from=rpm_from_tpm, minimum=1)
    deployment: str = setting(doc="the deployment's name in the region (default: the model)",
                              default_from=lambda d: d["model"], check=matches(NAME_REASON))
    weight: float = setting(1.0, "relative share among equal regions", exclusive=True)
    default_max_tokens: int = setting(1024, "completion budget of requests naming none",
                                      minimum=1)
    sku: str = setting("standard", "standard: pay-as-you-go; provisioned: PTU, used before "
                                   "the standard deployments of its priority tier",
                       choices=SKUS)

    @property
    def provisioned(self) -> bool:
        return self.sku == "provisioned"


@dataclass(frozen=True, kw_only=True)
class Region:
    name: str = setting(doc="unique region name", required=True, fallback="?",
                        check=matches(NAME_REASON))
    kind: str = setting("azure", "API flavour", choices=KINDS)
    endpoint: str = setting(doc="base URL", required=True, check=http_url,
                            normalize=lambda url: url.rstrip("/"),
                            simulated="http://simulated.invalid")
    # Before api_key, whose check reads it.
    auth: str = setting("key", "key: send api_key; entra: a Microsoft Entra ID token",
                        choices=AUTH_MODES, check=entra_only_for_azure)
    api_key: Secret | None = setting(  # noqa: RUF009 (setting is a field specifier)
        None, "the region's key", simulated=None, check=no_key_with_entra)
    entra_client_id: str | None = setting(
        None, "a user-assigned managed identity's client ID (default: AZURE_CLIENT_ID, "
              "else the system-assigned identity)", simulated=None, check=entra_client,
        normalize=lambda client_id: client_id or None)
    api_version: str | None = setting(None, "Azure api-version: v1, or a dated version",
                                      check=azure_api_version)
    priority: int = setting(0, "lower is preferred; higher tiers only when lower are "
                               "exhausted")
    deployments: Mapping[str, Deployment] = setting(
        doc="model name -> deployment",
        required="is required: map at least one model to a deployment",
        non_empty="must be a non-empty mapping of model name to deployment",
        key_reason="model names must be 1-64 letters, digits, '.', '_' or '-'")

    def __repr__(self) -> str:  # endpoints can be private; keys are Secrets anyway
        return f"Region(name={self.name!r}, kind={self.kind!r}, priority={self.priority})"


@dataclass(frozen=True)
class ClientBudget:
    """A client's limits on one model (each optional): its own rates and token quotas."""

    tpm: int | None = setting(None, "tokens per minute", minimum=1)
    rpm: int | None = setting(None, "requests per minute", minimum=1)
    tokens_per_day: int | None = setting(None, "tokens per UTC day", minimum=1)
    tokens_per_month: int | None = setting(None, "tokens per UTC calendar month", minimum=1)


@dataclass(frozen=True, kw_only=True)
class Client:
    """A client (tenant) of the pool, known by its API key. load.py checks what spans
    clients or sections: keys differ, `class` is a queue class, budgets name models."""

    name: str = setting(doc="unique client name (a metric label)", required=True,
                        fallback="?", check=matches(NAME_REASON))
    # Before key, whose check reads it.
    key_sha256: str | None = setting(
        None, "the SHA-256 of the client's key, 64 hex digits (the file holds no secret)",
        check=sha256_hex, normalize=lambda digest: digest.lower() if digest else digest)
    key: Secret | None = setting(  # noqa: RUF009 (setting is a field specifier)
        None, "the client's API key, usually ${VAR}", check=one_key)
    priority_class: str | None = setting(
        None, "admission-queue class of its requests (one of admission_queue.classes)",
        yaml_name="class")
    weight: float = setting(1.0, "its share of the pool when the pool runs short",
                            exclusive=True)
    budgets: Mapping[str, ClientBudget] = setting(
        doc="model name -> its budget for that model", factory=dict,
        non_empty="must be a non-empty mapping of model name to budget",
        key_reason="model names must be 1-64 letters, digits, '.', '_' or '-'")

    def __repr__(self) -> str:  # never the key, nor its digest
        return (f"Client(name={self.name!r}, class={self.priority_class!r}, "
                f"weight={self.weight}, budgets={sorted(self.budgets)})")


@dataclass(frozen=True)
class FairShare:
    """When the pool runs short, each client with recent demand gets a share of it in
    proportion to its weight (weighted max-min: what a modest client leaves goes to
    the others)."""

    enabled: bool = setting(True, "false: no fair share, only the clients' budgets")
    window_seconds: float = setting(10.0, "how long demand and usage are remembered",
                                    exclusive=True)
    headroom: float = setting(0.05, "share of the pool kept free for clients asking less "
                                    "than their share", check=below_half)


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
    regions: tuple[Region, ...] = setting(
        (), "where requests go", required="is required: list at least one region",
        non_empty="must list at least one region", unique="name")
    learned_capacity: LearnedCapacity = field(default_factory=LearnedCapacity)
    latency_weighting: LatencyWeighting = field(default_factory=LatencyWeighting)
    admission_queue: AdmissionQueue = field(default_factory=AdmissionQueue)
    responses: Responses = field(default_factory=Responses)
    clients: tuple[Client, ...] = setting(
        (), "the clients (tenants) and their keys, budgets and weights", unique="name")
    fair_share: FairShare = field(default_factory=FairShare)
    source: str = setting("<defaults>", "the file this was read from", internal=True)

    @property
    def models(self) -> dict[str, tuple[Target, ...]]:
        out: dict[str, list[Target]] = {}
        for region in self.regions:
            for model, dep in region.deployments.items():
                out.setdefault(model, []).append(Target(region, dep))
        return {m: tuple(t) for m, t in out.items()}
