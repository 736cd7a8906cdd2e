"""Prometheus metrics of one gateway (own registry, so several gateways can live in one process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    """The gateway's Prometheus metrics, in their own registry so several gateways can share a process (tests)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.accepted = Counter("fediomt_edge_updates_accepted", "Device updates accepted", registry=r)
        self.rejected = Counter("fediomt_edge_updates_rejected", "Device updates rejected", ["reason"], registry=r)
        self.bounded = Counter("fediomt_edge_updates_bounded", "Updates scaled down or sample-capped by edge.bounds",
                               registry=r)
        self.bytes_in = Counter("fediomt_edge_bytes_in", "Bytes received (updates, rounds, models)", registry=r)
        self.bytes_out = Counter("fediomt_edge_bytes_out", "Bytes published (aggregates, relays, acks)", registry=r)
        self.filter_decisions = Counter("fediomt_edge_filter_decisions", "Filter verdicts per update",
                                        ["filter", "decision"], registry=r)
        self.round_latency = Histogram("fediomt_edge_round_seconds", "From announcement to aggregate forwarded",
                                       buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800), registry=r)
        self.aggregates = Counter("fediomt_edge_aggregates", "Aggregates published", ["significant"], registry=r)
        self.abandoned = Counter("fediomt_edge_aggregates_abandoned",
                                 "Aggregates never receipted by the cloud before it closed their round", registry=r)
        self.pending = Gauge("fediomt_edge_pending_updates", "Accepted updates waiting for aggregation", registry=r)
        self.model_version = Gauge("fediomt_edge_model_version", "Global model version relayed last", registry=r)
        self.full_model_version = Gauge("fediomt_edge_full_model_version",
                                        "Version held in full for devices catching up (-1: none, they wait)",
                                        registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP (no-op when port is 0)."""
        if port:
            start_http_server(port, addr=host, registry=self.registry)
