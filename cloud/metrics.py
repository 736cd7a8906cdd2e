"""Prometheus metrics of the cloud aggregator (own registry, so tests can run several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    """The cloud aggregator's Prometheus metrics, in their own registry so tests can run several in one process."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.round = Gauge("fediomt_cloud_round", "Rounds closed so far", registry=r)
        self.accuracy = Gauge("fediomt_cloud_accuracy", "Held-out accuracy of the global model", registry=r)
        self.loss = Gauge("fediomt_cloud_loss", "Held-out cross-entropy of the global model", registry=r)
        self.epsilon = Gauge("fediomt_cloud_epsilon", "epsilon(delta) spent so far", ["level"], registry=r)
        self.aggregates = Counter("fediomt_cloud_aggregates_accepted", "Edge aggregates accepted", ["edge"],
                                  registry=r)
        self.rejected = Counter("fediomt_cloud_aggregates_rejected", "Edge aggregates rejected", ["reason"],
                                registry=r)
        self.bytes_up = Counter("fediomt_cloud_bytes_up", "Device->edge update bytes the edges reported", registry=r)
        self.bytes_down = Counter("fediomt_cloud_bytes_down", "Model + announcement bytes to addressed devices",
                                  registry=r)
        self.round_seconds = Histogram("fediomt_cloud_round_seconds", "Announcement to round closed",
                                       buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=r)
        self.step_seconds = Histogram("fediomt_cloud_step_seconds", "Combine, apply, evaluate, checkpoint, publish",
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP (no-op when port is 0)."""
        if port:
            start_http_server(port, addr=host, registry=self.registry)
