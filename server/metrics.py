"""Every Prometheus metric in one place (names carry the gpt4all_j_ prefix and unit suffixes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from backends.engine_api import Engines

PREFIX = "gpt4all_j_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Metrics:
    """The server's metrics, on a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(PREFIX + "requests_total", "HTTP requests by route and status.",
                                ["route", "status"], registry=r)
        self.latency = Histogram(PREFIX + "request_duration_seconds", "Time from request to last byte.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from request to first token.",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens_total", "Prompt tokens processed.", ["model"],
                                     registry=r)
        self.completion_tokens = Counter(PREFIX + "completion_tokens_total", "Tokens generated.", ["model"],
                                         registry=r)
        self.tokens_per_second = Histogram(PREFIX + "generation_tokens_per_second",
                                           "Generation speed of each request.", ["model"],
                                           buckets=RATE_BUCKETS, registry=r)
        self.queue_wait = Histogram(PREFIX + "queue_wait_seconds", "Time a job waited for a worker.",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter(PREFIX + "rejected_requests_total", "Requests refused, by reason.",
                                ["reason"], registry=r)

    def watch_pool(self, pool: Engines) -> None:
        """Expose the engines' live state (queue depth, busy/alive workers, restarts) at scrape time, from
        their status snapshot (models that have not started are left out)."""
        self.registry.register(_PoolCollector(pool))


class _PoolCollector:
    def __init__(self, pool: Engines) -> None:
        self.pool = pool

    def describe(self):
        return []

    def collect(self):
        depth = GaugeMetricFamily(PREFIX + "queue_depth_requests", "Jobs waiting for a worker.", labels=["model"])
        busy = GaugeMetricFamily(PREFIX + "workers_busy", "Generations running (one per busy ctransformers worker; "
                                  "up to `parallel` per ggml engine process).", labels=["model"])
        alive = GaugeMetricFamily(PREFIX + "workers_alive", "Workers loaded and running.", labels=["model"])
        up = GaugeMetricFamily(PREFIX + "model_available", "1 if the model takes requests.", labels=["model"])
        restarts = CounterMetricFamily(PREFIX + "worker_restarts", "Workers replaced after a crash.",
                                       labels=["model"])
        for name, s in self.pool.status().items():
            if not s.started:
                continue
            depth.add_metric([name], s.queued)
            busy.add_metric([name], s.running)
            alive.add_metric([name], s.alive)
            up.add_metric([name], 1 if s.available else 0)
            restarts.add_metric([name], s.restarts)
        yield from (depth, busy, alive, up, restarts)
