"""Prometheus metrics of one server (``GET /metrics``), in a registry of their own.

Each app gets its own ``CollectorRegistry``, so several servers (tests, Ray replicas) in one process
never share counts. Names follow Prometheus conventions (``_total`` counters, ``_seconds`` latencies).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class ServeMetrics:
    """Requests, errors, images, batch sizes, queue and compute latency, queue depth.

    Attributes:
        requests: ``share_requests_total{endpoint, status}``: every answered request by HTTP status.
        errors: ``share_errors_total{reason}``: validation, queue_full, disconnected, auth, internal, ...
        images: ``share_images_total``: images returned.
        batch_size: ``share_batch_size``: images per pipeline call (histogram).
        queue_seconds: ``share_queue_seconds``: arrival to the start of its pipeline call, per request.
        compute_seconds: ``share_compute_seconds``: duration of each pipeline call.
        queued_images: ``share_queued_images``: images waiting for a batch now.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "share_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "share_errors", "requests that got no image, by reason", ["reason"], registry=self.registry
        )
        self.images = Counter("share_images", "images returned", registry=self.registry)
        self.batch_size = Histogram(
            "share_batch_size", "images per pipeline call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_seconds = Histogram(
            "share_queue_seconds",
            "seconds from a request's arrival to the start of its pipeline call",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "share_compute_seconds", "seconds of each pipeline call", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.queued_images = Gauge("share_queued_images", "images waiting for a batch", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
