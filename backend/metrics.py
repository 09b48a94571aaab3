"""``/metrics`` in Prometheus's text format, counting every request once however many workers serve.

With ``WORKERS`` > 1 each ``serve`` worker is its own process. ``serve``'s supervisor gives its workers
one folder (``PROMETHEUS_MULTIPROC_DIR``, under ``MODEL_DIR``, emptied at start): prometheus-client's
multiprocess mode keeps each process's counters in files there, and a scrape, whichever worker
answers it, adds them all up. A single process keeps them in memory.

Routes are labelled by their rule (``/predict``), never by the path a client sent, so probing unknown
paths cannot grow the label set; every unknown path is ``<unmatched>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

REQUESTS = Counter(
    "dermassist_http_requests", "HTTP requests answered, by route and status", ["route", "status"]
)
LATENCY = Histogram(
    "dermassist_http_request_seconds",
    "Time to answer an HTTP request, by route",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
WEBHOOK_EVENTS = Counter("dermassist_webhook_events", "Webhook events received, by action", ["action"])
PREDICT_TASKS = Counter("dermassist_predict_tasks", "Tasks sent to /predict, by outcome", ["outcome"])
UNMATCHED = "<unmatched>"


class _Snapshot(Collector):
    """Values read at scrape time (the store's counts, the served version), as gauges."""

    def __init__(self, read: Callable[[], dict[str, float]], version: str) -> None:
        self.read, self.version = read, version

    def collect(self) -> Iterator[Metric]:
        store = GaugeMetricFamily("dermassist_store_rows", "Rows in the store", labels=["table"])
        for table, count in self.read().items():
            store.add_metric([table], count)
        yield store
        served = GaugeMetricFamily("dermassist_model_info", "The served model version", labels=["version"])
        served.add_metric([self.version], 1.0)
        yield served


def exposition(multiprocess_dir: Path | None, store: Callable[[], dict[str, float]], version: str) -> bytes:
    """The scrape: every process's counters (multiprocess mode) or this one's, then the snapshot."""
    if multiprocess_dir is not None:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
        counters = generate_latest(registry)
    else:
        counters = generate_latest(REGISTRY)
    snapshot = CollectorRegistry()
    snapshot.register(_Snapshot(store, version))
    return counters + generate_latest(snapshot)


__all__ = [
    "CONTENT_TYPE_LATEST",
    "LATENCY",
    "PREDICT_TASKS",
    "REQUESTS",
    "UNMATCHED",
    "WEBHOOK_EVENTS",
    "exposition",
]
