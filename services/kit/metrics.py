"""Prometheus metrics every service exports on its own HTTP port.

Labels carry the service and RPC names and the status code, never request content.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class ServiceMetrics:
    """A metric set bound to its own registry, so several servers can live in one test process."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "facexplain_requests_total", "RPCs handled", ["service", "method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "facexplain_request_seconds",
            "RPC latency",
            ["service", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.items = Counter(
            "facexplain_items_total",
            "Items processed inside batch RPCs by outcome",
            ["service", "method", "outcome"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "facexplain_model_served",
            "1 for the model version currently served",
            ["service", "model", "version"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "facexplain_model_reloads_total",
            "Hot-reload attempts by result",
            ["service", "result"],
            registry=self.registry,
        )
        self.registry_up = Gauge(
            "facexplain_registry_reachable",
            "1 when the model registry answered the last poll",
            ["service"],
            registry=self.registry,
        )
        # Dynamic batching (services/kit/batching.py), labelled by batcher (one per model slot).
        self.batch_size = Histogram(
            "facexplain_batch_size",
            "Items per batched forward pass",
            ["service", "batcher"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256),
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "facexplain_batch_queue_wait_seconds",
            "Seconds an item waited in the batching queue before its forward pass started",
            ["service", "batcher"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "facexplain_batch_queue_depth",
            "Items waiting in the batching queue",
            ["service", "batcher"],
            registry=self.registry,
        )
        self.queue_dropped = Counter(
            "facexplain_batch_dropped_total",
            "Items that never reached a forward pass, by reason (queue_full, deadline, cancelled)",
            ["service", "batcher", "reason"],
            registry=self.registry,
        )
        self.port: int | None = None
        self._http: Any = None
        self._served: dict[str, tuple[str, str]] = {}  # kind -> (model, version) marked served

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose ``/metrics``; returns the bound port (useful when asked for port 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        self.port = int(server.server_port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None

    def set_served(self, model: str, version: str, kind: str = "") -> None:
        """Mark (model, version) as the one served for ``kind``, replacing that kind's previous entry.

        Keyed by kind, not by model name: a swap from local weights ("dlib-resnet128") to a registry
        version ("facexplain-fr-dlib128") replaces the entry, and a service serving a decoder and an
        FR model keeps one entry for each.
        """
        previous = self._served.get(kind)
        if previous is not None and previous != (model, version):
            self.model_info.remove(self.service, *previous)
        self._served[kind] = (model, version)
        self.model_info.labels(self.service, model, version).set(1)
