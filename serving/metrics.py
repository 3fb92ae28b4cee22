"""Prometheus metrics of the service, named like vLLM's with a `jaxengine:` prefix.

Per-request metrics (tokens, latencies, finish reasons) are recorded by the servicer as
calls progress (gRPC calls and HTTP requests alike: `EngineServicer.record_output`). Engine-wide state (running / waiting requests, KV-cache usage, prefix-cache
queries and hits, preemptions) is read from the engine at scrape time, on the engine
thread (`AsyncEngine.call`), so a scrape never races a step.

Every server gets its own `CollectorRegistry` (several servers may live in one process).
With several front-end processes (serving/frontends.py) the serving process's endpoint adds
the others' per-request metrics, fetched at scrape time, to its own (`add_source`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

# vLLM's buckets (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector:
    """Gauges and cumulative counters read from `Engine.stats()` at scrape time."""

    def __init__(self, stats: Callable[[], dict | None], model_name: str):
        self._stats = stats
        self._model = model_name

    def collect(self):
        s = self._stats()
        if s is None:  # still loading
            return
        labels = ["model_name"]
        for name, doc, value in (
            ("jaxengine:num_requests_running", "Number of requests in the running batch.", s["num_running"]),
            ("jaxengine:num_requests_waiting", "Number of requests waiting to be scheduled.", s["num_waiting"]),
            ("jaxengine:kv_cache_usage_perc", "KV-cache usage: fraction of blocks in use (1 = full).", s["kv_cache_usage"]),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self._model], float(value))
            yield g
        for name, doc, value in (
            ("jaxengine:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s["prefix_cache_queries"]),
            ("jaxengine:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["prefix_cache_hits"]),
            ("jaxengine:num_preemptions", "Cumulative number of preemptions.", s["num_preemptions"]),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self._model], float(value))
            yield c


# A registry's metrics as plain data, to send between processes:
# [(name, documentation, type, unit, [(sample name, labels, value), ...]), ...]
MetricFamilies = list[tuple[str, str, str, str, list[tuple[str, dict, float]]]]


def _families(registry: CollectorRegistry) -> MetricFamilies:
    return [(m.name, m.documentation, m.type, m.unit, [(s.name, s.labels, s.value) for s in m.samples])
            for m in registry.collect()]


def merge_families(groups: list[MetricFamilies]) -> list[Metric]:
    """Several processes' counters and histograms as one: values summed per sample name and
    labels (histogram buckets too: every process uses the same buckets); `_created`, the
    earliest."""
    merged: dict[str, tuple[Metric, dict]] = {}
    for group in groups:
        for name, doc, typ, unit, samples in group:
            metric, values = merged.setdefault(name, (Metric(name, doc, typ, unit), {}))
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                old = values.get(key)
                values[key] = value if old is None else min(old, value) if sample.endswith("_created") else old + value
    for metric, values in merged.values():
        for (sample, labels), value in values.items():
            metric.add_sample(sample, dict(labels), value)
    return [metric for metric, _ in merged.values()]


class _RequestMetricsCollector:
    """This process's per-request metrics plus those of the other front-end processes."""

    def __init__(self, local: CollectorRegistry, sources: list[Callable[[], list[MetricFamilies]]]):
        self._local, self._sources = local, sources

    def collect(self):
        return merge_families([_families(self._local)] + [g for source in self._sources for g in source()])

    def describe(self):
        return list(self._local.collect())  # the names, for the registry's duplicate check


class ServingMetrics:
    def __init__(self, model_name: str, stats: Callable[[], dict | None]):
        self.registry = CollectorRegistry()  # what /metrics serves
        self.model_name = model_name
        self._requests = CollectorRegistry()  # this process's per-request metrics
        self._sources: list[Callable[[], list[MetricFamilies]]] = []
        reg, labels = self._requests, ["model_name"]
        self.registry.register(_EngineStatsCollector(stats, model_name))
        self.prompt_tokens = Counter("jaxengine:prompt_tokens", "Number of prefill tokens processed.", labels, registry=reg).labels(model_name)
        self.generation_tokens = Counter("jaxengine:generation_tokens", "Number of generation tokens processed.", labels, registry=reg).labels(model_name)
        self._success = Counter("jaxengine:request_success", "Count of finished requests by finish reason.", labels + ["finished_reason"], registry=reg)
        self.ttft = Histogram("jaxengine:time_to_first_token_seconds", "Time to first token.", labels, buckets=_TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram("jaxengine:inter_token_latency_seconds", "Time between streamed tokens.", labels, buckets=_ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("jaxengine:e2e_request_latency_seconds", "End-to-end request latency.", labels, buckets=_LATENCY_BUCKETS, registry=reg).labels(model_name)
        self.queue_time = Histogram("jaxengine:request_queue_time_seconds", "Time requests spent waiting before first scheduled.", labels, buckets=_LATENCY_BUCKETS, registry=reg).labels(model_name)
        self.registry.register(_RequestMetricsCollector(reg, self._sources))
        self._http = None

    def request_families(self) -> MetricFamilies:
        """This process's per-request metrics, to send to the process that serves /metrics."""
        return _families(self._requests)

    def add_source(self, source: Callable[[], list[MetricFamilies]]) -> None:
        """Also serve other processes' per-request metrics, summed with these at scrape time."""
        self._sources.append(source)

    def request_finished(self, finish_reason: str, ttft: float | None, e2e: float | None, queue: float | None) -> None:
        self._success.labels(self.model_name, finish_reason).inc()
        for hist, value in ((self.ttft, ttft), (self.e2e, e2e), (self.queue_time, queue)):
            if value is not None:
                hist.observe(value)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics on host:port (0 = any free port); returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
