"""Prometheus metrics of one Bastion process (issue 19 item 3), with ``prometheus-client``.

Each process builds one :class:`Metrics`, on a registry of its own (never
``prometheus_client``'s global one: two apps built in one test process, or a
test after another, share no counts). It is served in the Prometheus text
exposition format (version 0.0.4) at ``/metrics`` on the process's internal
mTLS listener only, to the configured scraper's SPIFFE ID
(``bastion.api.metrics``, ``bastion.compose``).

Labels are bounded by construction, and carry no tenant's data:

* requests: the route *template* (``/v1/tenants/{tenant_id}``, never a path
  with ids in it; a path that matches no route is ``<unmatched>``), the method
  (an unknown one is ``OTHER``) and the status class (``2xx``...);
* budget spend: by model name (the configured models only), never by tenant
  or user — tenants are unbounded, and tenant ids would leave the database's
  row-level security for the monitoring stack; per-tenant spend is in the
  metering tables and the audit trail;
* detector firings: by rule name (the detectors' fixed set);
* queue depth and rotation ages are read on each scrape by probes the
  composition root registers (the worker's queue, the key ring).

This module imports nothing of Bastion above the ground floor: the domains
and the composition root call into it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from bastion.logs import get_logger

_log = get_logger("bastion.telemetry")

# Every name here is in the classic charset, so the text format 0.0.4 (which
# every Prometheus version reads) says all of it.
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
UNMATCHED: Final = "<unmatched>"
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds; the gateway's calls run from milliseconds (cache hits) to a minute (long answers).
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Probe = Callable[["Metrics"], Awaitable[None]]


def status_class(status: int) -> str:
    """``2xx``, ``4xx``...: one label value per class, not one per code."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class Metrics:
    """The metrics of one process and the probes that refresh some of them on scrape."""

    def __init__(self, process: str) -> None:
        self.process = process
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "bastion_http_requests",
            "HTTP requests answered, by route template, method and status class",
            ["route", "method", "status_class"],
            registry=r,
        )
        self.latency = Histogram(
            "bastion_http_request_duration_seconds",
            "Time from a request's arrival to its last byte, by route template and method",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.spend = Counter(
            "bastion_budget_spend_micro_usd",
            "Model spend in integer micro-USD at list price, by model (never by tenant)",
            ["model"],
            registry=r,
        )
        self.queue_jobs = Gauge(
            "bastion_queue_jobs",
            "Jobs in the worker's queue by queue and status, read on scrape",
            ["queue", "status"],
            registry=r,
        )
        self.rotation_age = Gauge(
            "bastion_key_rotation_age_seconds",
            "Seconds since the oldest key in use of each kind was created, read on scrape",
            ["kind"],
            registry=r,
        )
        self.detector_firings = Counter(
            "bastion_detector_firings",
            "Times a live detector rule fired, by rule",
            ["rule"],
            registry=r,
        )
        self.probe_failures = Counter(
            "bastion_metrics_probe_failures",
            "Scrapes where a probe could not read its source (its metric is then left out)",
            ["probe"],
            registry=r,
        )
        self._probes: list[tuple[str, Probe, Gauge | None]] = []
        # labels() hashes and locks on every call; the hot path reuses children.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    # -- what the edges and the domains record ------------------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request (``route``: the matched template, or :data:`UNMATCHED`)."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            verb = method if method in METHODS else "OTHER"
            children = (
                self.requests.labels(route, verb, status_class(status)),
                self.latency.labels(route, verb),
            )
            if len(self._request_children) < 10_000:  # bounded whatever the traffic
                self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def spent(self, model: str, micro_usd: int) -> None:
        """``micro_usd`` (an integer amount of money) spent on ``model``."""
        if micro_usd > 0:
            self.spend.labels(model).inc(micro_usd)

    def detector_fired(self, rule: str) -> None:
        """A detector's ``rule`` fired (part D of issue 19 calls this)."""
        self.detector_firings.labels(rule).inc()

    def set_queue_depth(self, depth: Mapping[tuple[str, str], int]) -> None:
        """The queue's job counts, keyed ``(queue, status)``."""
        self.queue_jobs.clear()
        for (queue, status), count in depth.items():
            self.queue_jobs.labels(queue, status).set(count)

    def set_rotation_ages(self, ages: Mapping[str, float]) -> None:
        """Seconds since each key kind's oldest key in use was created."""
        self.rotation_age.clear()
        for kind, seconds in ages.items():
            self.rotation_age.labels(kind).set(seconds)

    # -- scraping ------------------------------------------------------------------------

    def add_probe(self, name: str, probe: Probe, feeds: Gauge | None = None) -> None:
        """``probe`` refreshes ``feeds`` at each scrape (a database or key-ring read)."""
        self._probes.append((name, probe, feeds))

    async def scrape(self) -> bytes:
        """Run the probes, then return the exposition text. A probe that fails
        is logged and counted, and the gauge it feeds left out (no stale value
        passes for a fresh one); the scrape still answers with the rest."""
        for name, probe, feeds in self._probes:
            try:
                await probe(self)
            except Exception as error:
                if feeds is not None:
                    feeds.clear()
                self.probe_failures.labels(name).inc()
                _log.warning("metrics_probe_failed", probe=name, error=type(error).__name__)
        return generate_latest(self.registry)
