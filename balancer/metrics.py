"""Every Prometheus metric the gateway exports, in one place.

Names are a contract with dashboards and alerts: prefix `balancer_`, base units
(`_seconds`, `_tokens`), counters end in `_total`. Labels come from a small
fixed set (model, region, status, reason, kind) so cardinality stays bounded:
no request ids, no client keys. Each app owns its registry, so tests stay isolated.

Under `serve --workers N` (PROMETHEUS_MULTIPROC_DIR set by the supervisor) the values
live in prometheus_client's multiprocess files and a scrape renders every worker's:
counters and histograms are summed; each gauge says how workers combine in its
`multiprocess_mode` (ignored by a single process): `livesum` for per-process amounts,
`livemax` for the worst worker, `mostrecent` for the last value any worker set. The
gauges set from the shared store at each scrape (`Metrics.scraped`) are the scraping
worker's own (`WorkersCollector`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.label_names: dict[str, tuple[str, ...]] = {}  # for the README table

        def declare(kind: type[Any]) -> Callable[..., Any]:
            def make(name: str, doc: str, labelnames: Sequence[str] = (), **kw: Any) -> Any:
                self.label_names[name] = tuple(labelnames)
                return kind(name, doc, labelnames, **kw)
            return make

        counter, gauge, histogram = declare(Counter), declare(Gauge), declare(Histogram)
        # Per-region gauges, set from the store's snapshot at each scrape.
        region_gauge = partial(gauge, labelnames=("model", "region"), registry=r,
                               multiprocess_mode="mostrecent")
        self.requests = counter(
            "balancer_requests", "Client requests answered, by the region that served them "
            "(\"none\" when no region did) and the HTTP status returned to the client.",
            ["model", "region", "status", "operation"], registry=r)
        self.upstream_latency = histogram(
            "balancer_upstream_latency_seconds", "Time from sending to a region until its "
            "response headers arrived, per attempt.",
            ["model", "region", "operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = histogram(
            "balancer_time_to_first_token_seconds", "Streams: time from sending to a region "
            "until the first chunk arrived.",
            ["model", "region"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_throttled = counter(
            "balancer_upstream_throttled", "429 answers received from regions, by the "
            "deployment's sku: a provisioned (PTU) one answers 429 whenever it is fully "
            "used, its normal state under load, so alerts count only sku=\"standard\".",
            ["model", "region", "sku"], registry=r)
        self.upstream_errors = counter(
            "balancer_upstream_errors", "Failed attempts at a region: 5xx, connect errors, "
            "timeouts, broken streams, no Entra token (reason auth), an answer larger than "
            "gateway.max_upstream_body_bytes (reason upstream_body_too_large).",
            ["model", "region", "reason"], registry=r)
        self.tokens = counter(
            "balancer_tokens", "Tokens the regions reported in usage, by kind "
            "(prompt, completion).", ["model", "region", "kind", "operation"], registry=r)
        self.spilled_requests = counter(
            "balancer_spilled_requests", "Requests of a model that has provisioned (PTU) "
            "deployments that a standard deployment served (the PTUs were full, cooling "
            "down or failing, or a stored response lives there), counted once when their "
            "usage is settled.", ["model"], registry=r)
        self.spilled_tokens = counter(
            "balancer_spilled_tokens", "Prompt + completion tokens, as the region reported "
            "them, of the spilled requests (balancer_spilled_requests_total).", ["model"],
            registry=r)
        self.selections = counter(
            "balancer_selections", "Times a region was picked and reserved for an attempt.",
            ["model", "region"], registry=r)
        self.retries = counter(
            "balancer_retries", "Attempts retried on another region, by reason.",
            ["model", "reason"], registry=r)
        self.rejections = counter(
            "balancer_client_rejections", "Requests refused before reaching a region, by "
            "reason (auth, bad_request, not_found, too_large, no_capacity, client_limit: the "
            "client's own budget or fair share; balancer_client_limited_total says which).",
            ["reason"], registry=r)
        # Per client (a name from regions.yaml's `clients`, or key-N for the N-th of
        # BALANCER_API_KEYS, or anonymous: never request input) and configured model.
        self.client_requests = counter(
            "balancer_client_requests", "Client requests answered, by client, model and the "
            "HTTP status returned.", ["client", "model", "status"], registry=r)
        self.client_tokens = counter(
            "balancer_client_tokens", "Tokens the regions reported in usage for a client's "
            "requests, by kind (prompt, completion).", ["client", "model", "kind"], registry=r)
        self.client_limited = counter(
            "balancer_client_limited", "A client's requests refused with 429 before reaching a "
            "region, by the limit hit: its own budget (rpm, tpm, day, month), its fair share "
            "of a pool that runs short (fair_share), or the pool itself (no_capacity).",
            ["client", "model", "reason"], registry=r)
        self.client_budget = gauge(
            "balancer_client_budget_tokens", "A client's configured token budget for a model, "
            "by period (minute: tpm, day, month).", ["client", "model", "period"], registry=r,
            multiprocess_mode="mostrecent")
        self.client_remaining = gauge(
            "balancer_client_budget_remaining_tokens", "Tokens left of a client's budget, by "
            "period (minute: its tpm bucket now; day, month: the quota less what was used), "
            "read from the store at scrape time.", ["client", "model", "period"], registry=r,
            multiprocess_mode="mostrecent")
        self.remaining_tokens = region_gauge(
            "balancer_remaining_tokens", "Tokens left in a region's bucket, read from the "
            "store at scrape time.")
        self.capacity_tokens = region_gauge(
            "balancer_capacity_tokens", "A region's bucket size (its burst window of TPM).")
        self.remaining_requests = region_gauge(
            "balancer_remaining_requests", "Requests left in a region's request (RPM) bucket, "
            "read from the store at scrape time.")
        self.region_tpm = region_gauge(
            "balancer_region_tpm", "A region's configured tokens-per-minute quota for a model.")
        self.capacity_factor = region_gauge(
            "balancer_effective_capacity_ratio", "Learned share of a region's configured "
            "token capacity that the gateway uses (1 = all; lower after unexpected 429s).")
        self.latency_per_token = region_gauge(
            "balancer_latency_per_token_seconds", "Smoothed seconds per output token of a "
            "region, shared across replicas (0 until sampled; only with latency weighting).")
        self.deployment_utilization = region_gauge(
            "balancer_deployment_utilization_ratio", "A provisioned deployment's utilization "
            "(0-1) as its last response's azure-openai-deployment-utilization header said; "
            "no series for regions that send none.")
        self.cooldown = region_gauge(
            "balancer_region_cooldown_seconds", "Seconds left before a cooled-down region "
            "is used again (0 when usable).")
        self.circuit_open = region_gauge(
            "balancer_circuit_open", "1 while a region's circuit breaker is open, else 0.")
        self.store_degraded = gauge(
            "balancer_store_degraded", "1 while the shared store is unreachable and this "
            "replica serves from local buckets.", registry=r, multiprocess_mode="livemax")
        self.store_round_trips = counter(
            "balancer_store_round_trips", "Round trips to the shared capacity store, by "
            "operation.", ["op"], registry=r)
        self.live_replicas = gauge(
            "balancer_live_replicas", "Gateway replicas heartbeating into the shared store "
            "(1 with the memory store).", registry=r, multiprocess_mode="mostrecent")
        self.config_reloads = counter(
            "balancer_config_reloads", "Attempts to reload regions.yaml, by result "
            "(success, failure).", ["result"], registry=r)
        self.queue_depth = gauge(
            "balancer_queue_depth", "Requests of this replica waiting in the admission queue "
            "for capacity.", ["model"], registry=r, multiprocess_mode="livesum")
        self.admission_wait = histogram(
            "balancer_admission_wait_seconds", "Time queued requests waited for capacity, by "
            "outcome (admitted, rejected at their deadline).", ["model", "outcome"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60), registry=r)
        self.in_flight = gauge(
            "balancer_in_flight_requests", "Client requests being served now.", registry=r,
            multiprocess_mode="livesum")
        self.event_loop_lag = gauge(
            "balancer_event_loop_lag_seconds", "How late the event loop ran a 0.1 s timer, "
            "worst over the last second: blocking work delays every request by as much.",
            registry=r, multiprocess_mode="livemax")
        # Set from the shared store by `gateway.admin.metrics` at each scrape (cleared
        # first, so a removed region or client vanishes): with several workers the
        # scraping worker renders its own, fresh, values of these (`exposition_registry`).
        self.scraped = (self.region_tpm, self.remaining_tokens, self.remaining_requests,
                        self.capacity_tokens, self.cooldown, self.circuit_open,
                        self.capacity_factor, self.latency_per_token, self.client_budget,
                        self.client_remaining, self.live_replicas)


def exposition_registry(metrics: Metrics) -> CollectorRegistry:
    """What GET /metrics renders: the app's registry, or, in prometheus_client's
    multiprocess mode (`serve --workers N`), every worker's values merged from the files
    in PROMETHEUS_MULTIPROC_DIR, whichever worker the scrape reaches."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return metrics.registry
    # The files cannot forget a series (prometheus_client warns on clear()); the gauges
    # set at scrape are rendered from this process, where clear() works.
    warnings.filterwarnings("ignore", "Clearing labels has not been implemented",
                            UserWarning)
    registry = CollectorRegistry()
    registry.register(WorkersCollector(metrics, path))
    return registry


class WorkersCollector(Collector):
    """Every worker's metrics from the multiprocess files, except the gauges set from
    the store at scrape time (`Metrics.scraped`): this worker's own values of those."""

    def __init__(self, metrics: Metrics, path: str):
        self.files = multiprocess.MultiProcessCollector(None, path)
        self.scraped = metrics.scraped
        self.names = {family.name for gauge in self.scraped for family in gauge.describe()}

    def collect(self) -> Iterator[Metric]:
        for family in self.files.collect():
            if family.name not in self.names:
                yield family
        for gauge in self.scraped:
            yield from gauge.collect()


def markdown() -> str:
    """The README's metric table (`python -m balancer.metrics`), from the definitions."""
    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    metrics = Metrics()
    for family in metrics.registry.collect():  # in declaration order
        full = family.name + ("_total" if family.type == "counter" else "")
        labels = ", ".join(metrics.label_names[family.name]) or "—"
        rows.append(f"| `{full}` | {family.type} | {labels} | {family.documentation} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
