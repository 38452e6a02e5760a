"""Prometheus metrics (R-OBS): what opsexec counts, and the registries that export it.

Instruments are process-wide, as a Prometheus client's counters always are: the engine,
the worker, the reaper and the HTTP middleware record into them through the small
functions below, each called once at the single place its event happens. They are
created *unregistered* and added to one registry per exporter — each app's ``/metrics``
(:func:`new_registry`) and a worker's ``--metrics-port`` — so several apps in one process
(the test suite does this) never collide on names, and nothing depends on
prometheus_client's global default registry.

Gauges whose truth is in the database (queue depth, DLQ size, live workers, the runtime
kill switch) are read at scrape time by :class:`DatabaseGauges` with one cheap query,
rather than being kept in step by every writer in every process. Every process would
report the same values, so dashboards aggregate them with ``max``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Final

import asyncpg
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from opsexec import __version__
from opsexec.observability.fields import ExecutionRow
from opsexec.store.gauges import OperationalGauges, read_operational_gauges

__all__ = [
    "CANCELLATION_SOURCES",
    "DatabaseGauges",
    "dead_lettered",
    "execution_finished",
    "http_request",
    "idempotent_hit",
    "lock_conflict",
    "locks_reaped",
    "new_registry",
    "rbac_violation",
    "reaper_pass",
]

logger = logging.getLogger(__name__)

# Executions run from well under a second (inventory counts) to an hour (a rolling deploy).
_DURATION_BUCKETS: Final = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    3600.0,
)
_QUEUE_WAIT_BUCKETS: Final = (
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
_HTTP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CANCELLATION_SOURCES: Final = ("user", "system")
RBAC_LAYERS: Final = ("api", "engine")
LOCK_REAP_REASONS: Final = ("expired", "taken_over")
REAPER_OUTCOMES: Final = ("ran", "skipped")

EXECUTION_DURATION = Histogram(
    "opsexec_execution_duration_seconds",
    "Executions from start to end, by the plan's primary action (the first step of its "
    "riskiest action class), SLA class and final status.",
    ["action", "sla_class", "status"],
    buckets=_DURATION_BUCKETS,
    registry=None,
)
EXECUTIONS_FINISHED = Counter(
    "opsexec_executions_finished_total",
    "Executions that reached a terminal status (run by the engine, or cancelled before "
    "running), by status, SLA class and mode.",
    ["status", "sla_class", "mode"],
    registry=None,
)
EXECUTION_TIMEOUTS = Counter(
    "opsexec_execution_timeouts_total",
    "Executions that ended timed out (their own timeout or a step's), by primary action and "
    "SLA class.",
    ["action", "sla_class"],
    registry=None,
)
CANCELLATIONS = Counter(
    "opsexec_cancellations_total",
    "Executions that ended cancelled: asked for by a person (user) or interrupted by "
    "opsexec itself, e.g. at shutdown (system).",
    ["source"],
    registry=None,
)
QUEUE_WAIT = Histogram(
    "opsexec_queue_wait_seconds",
    "Background executions' wait from enqueue (or approval) to their first lease.",
    ["sla_class"],
    buckets=_QUEUE_WAIT_BUCKETS,
    registry=None,
)
LOCK_CONFLICTS = Counter(
    "opsexec_lock_conflicts_total",
    "Lock acquisitions refused because another execution held a target.",
    registry=None,
)
LOCKS_REAPED = Counter(
    "opsexec_locks_reaped_total",
    "Expired locks removed by the reaper (expired) or taken over by a new owner (taken_over).",
    ["reason"],
    registry=None,
)
LEASE_EXPIRATIONS = Counter(
    "opsexec_lease_expirations_total",
    "Queue leases that expired (their worker died or stalled) and were reclaimed.",
    registry=None,
)
DEAD_LETTERED = Counter(
    "opsexec_dead_lettered_total",
    "Jobs moved to the dead-letter queue after spending their attempts.",
    registry=None,
)
REAPER_PASSES = Counter(
    "opsexec_reaper_passes_total",
    "Reaper passes in this process: ran, or skipped because another reaper was active.",
    ["outcome"],
    registry=None,
)
REAPER_LAST_PASS = Gauge(
    "opsexec_reaper_last_pass_timestamp_seconds",
    "Unix time of this process's last reaper pass (0: none yet).",
    registry=None,
)
RBAC_VIOLATIONS = Counter(
    "opsexec_rbac_violations_total",
    "Foreign-tenant probes (api) and permissions found revoked right before a run (engine).",
    ["layer"],
    registry=None,
)
IDEMPOTENT_HITS = Counter(
    "opsexec_idempotent_hits_total",
    "Submissions answered with the live execution they repeat instead of a new one.",
    registry=None,
)
HTTP_DURATION = Histogram(
    "opsexec_http_request_duration_seconds",
    "HTTP requests from arrival to response headers, by route template, method and status.",
    ["route", "method", "status"],
    buckets=_HTTP_BUCKETS,
    registry=None,
)
BUILD_INFO = Gauge(
    "opsexec_build_info", "Always 1; the running version.", ["version"], registry=None
)

_INSTRUMENTS: Final[tuple[Collector, ...]] = (
    EXECUTION_DURATION,
    EXECUTIONS_FINISHED,
    EXECUTION_TIMEOUTS,
    CANCELLATIONS,
    QUEUE_WAIT,
    LOCK_CONFLICTS,
    LOCKS_REAPED,
    LEASE_EXPIRATIONS,
    DEAD_LETTERED,
    REAPER_PASSES,
    REAPER_LAST_PASS,
    RBAC_VIOLATIONS,
    IDEMPOTENT_HITS,
    HTTP_DURATION,
    BUILD_INFO,
)

# Series with a known, small label set exist from the start at 0, so the first event
# is an increase that rate()/increase() can see (alerts on "any RBAC violation" rely on it).
for _source in CANCELLATION_SOURCES:
    CANCELLATIONS.labels(_source)
for _layer in RBAC_LAYERS:
    RBAC_VIOLATIONS.labels(_layer)
for _reason in LOCK_REAP_REASONS:
    LOCKS_REAPED.labels(_reason)
for _outcome in REAPER_OUTCOMES:
    REAPER_PASSES.labels(_outcome)
BUILD_INFO.labels(__version__).set(1)


def new_registry(*collectors: Collector, process: bool = True) -> CollectorRegistry:
    """A fresh registry with every instrument, the process collectors and ``collectors``."""
    registry = CollectorRegistry()
    for instrument in _INSTRUMENTS:
        registry.register(instrument)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


# --- recording: one call at the one place each event happens ---------------------------------


def execution_finished(execution: ExecutionRow, action: str | None = None) -> None:
    """An execution reached a terminal status; ``execution`` is its final row.

    Records throughput, duration (when it started), an execution timeout, a cancellation
    (user when someone asked for it, system otherwise) and its queue wait (background).
    """
    status = str(execution["status"])
    sla_class = str(execution["sla_class"])
    label = action or "none"
    EXECUTIONS_FINISHED.labels(status, sla_class, str(execution["execution_mode"])).inc()
    duration_ms = execution["duration_ms"]
    if duration_ms is not None:
        EXECUTION_DURATION.labels(label, sla_class, status).observe(duration_ms / 1000)
    if execution["timed_out"]:
        EXECUTION_TIMEOUTS.labels(label, sla_class).inc()
    if status == "cancelled":
        CANCELLATIONS.labels("user" if execution["cancelled_by"] is not None else "system").inc()
    queue_wait_ms = execution["queue_wait_ms"]
    if queue_wait_ms is not None:
        QUEUE_WAIT.labels(sla_class).observe(queue_wait_ms / 1000)


def idempotent_hit() -> None:
    IDEMPOTENT_HITS.inc()


def lock_conflict() -> None:
    LOCK_CONFLICTS.inc()


def locks_reaped(reason: str, count: int) -> None:
    if count:
        LOCKS_REAPED.labels(reason).inc(count)


def dead_lettered() -> None:
    DEAD_LETTERED.inc()


def reaper_pass(*, skipped: bool, leases_expired: int) -> None:
    REAPER_PASSES.labels("skipped" if skipped else "ran").inc()
    if leases_expired:
        LEASE_EXPIRATIONS.inc(leases_expired)
    REAPER_LAST_PASS.set(time.time())


def rbac_violation(layer: str) -> None:
    RBAC_VIOLATIONS.labels(layer).inc()


def http_request(route: str, method: str, status: int, seconds: float) -> None:
    HTTP_DURATION.labels(route, method, str(status)).observe(seconds)


# --- gauges read from the database at scrape time ---------------------------------------------


class DatabaseGauges:
    """A collector for the gauges whose truth is in the database.

    ``collect`` is synchronous (prometheus_client's contract) while the database is
    async, so the ``/metrics`` handler awaits :meth:`refresh` first and ``collect``
    renders that snapshot. A failed read exports ``opsexec_database_up 0`` and nothing
    else from the database, instead of stale numbers.
    """

    def __init__(self, *, fresh_within_s: float, kill_switch_env: bool) -> None:
        self.fresh_within_s = fresh_within_s
        self.kill_switch_env = kill_switch_env
        self._snapshot: OperationalGauges | None = None

    async def refresh(self, pool: asyncpg.Pool | None, *, timeout_s: float = 2.0) -> None:
        if pool is None:
            self._snapshot = None
            return
        try:
            async with pool.acquire(timeout=timeout_s) as connection:
                self._snapshot = await read_operational_gauges(
                    connection, fresh_within_s=self.fresh_within_s, timeout_s=timeout_s
                )
        except Exception as exc:  # a scrape reports the outage, it does not fail with it
            logger.warning("metrics: database gauges unavailable", extra={"error": repr(exc)})
            self._snapshot = None

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self._snapshot))

    def _families(self, snapshot: OperationalGauges | None) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "opsexec_database_up", "1 when this scrape could read the database, else 0."
        )
        up.add_metric([], 1.0 if snapshot is not None else 0.0)
        yield up
        depth = GaugeMetricFamily(
            "opsexec_queue_depth",
            "Queued background jobs: ready to lease, deferred (backoff, lock wait), or held "
            "until an approval releases them.",
            labels=["state"],
        )
        leased = GaugeMetricFamily("opsexec_queue_leased_jobs", "Jobs leased by a worker now.")
        oldest = GaugeMetricFamily(
            "opsexec_queue_oldest_ready_age_seconds",
            "How long the oldest ready job has been waiting (0 when none is).",
        )
        dlq = GaugeMetricFamily(
            "opsexec_dlq_entries", "Dead-lettered jobs not yet requeued (the DLQ size)."
        )
        workers = GaugeMetricFamily(
            "opsexec_workers",
            "Worker processes by heartbeat: running, draining, or stale (no heartbeat "
            "within three intervals and no goodbye: probably dead).",
            labels=["state"],
        )
        kill_switch = GaugeMetricFamily(
            "opsexec_kill_switch_engaged",
            "1 while new executions are refused service-wide (environment or runtime switch).",
        )
        if snapshot is not None:
            depth.add_metric(["ready"], snapshot.queue_ready)
            depth.add_metric(["deferred"], snapshot.queue_deferred)
            depth.add_metric(["held"], snapshot.queue_held)
            leased.add_metric([], snapshot.queue_leased)
            oldest.add_metric([], snapshot.oldest_ready_age_s)
            dlq.add_metric([], snapshot.dlq_entries)
            workers.add_metric(["running"], snapshot.workers_running)
            workers.add_metric(["draining"], snapshot.workers_draining)
            workers.add_metric(["stale"], snapshot.workers_stale)
            engaged = self.kill_switch_env or snapshot.kill_switch_runtime
            kill_switch.add_metric([], 1.0 if engaged else 0.0)
        yield from (depth, leased, oldest, dlq, workers, kill_switch)
