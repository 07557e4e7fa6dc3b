"""Prometheus metrics, built against an injected ``CollectorRegistry``.

Each process builds one ``Metrics`` at its entry point and passes it down; tests
build a fresh one per app and read values with ``registry.get_sample_value``.
Names carry the ``aisetl_`` prefix, counters end in ``_total``, and units are
base units (``_seconds``, ``_bytes``). The chart's dashboard queries exactly
these names.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60)


@dataclass
class Metrics:
    registry: CollectorRegistry
    http_requests: Counter
    http_duration: Histogram
    object_requests: Counter
    object_bytes: Counter
    etl_requests: Counter
    etl_errors: Counter
    etl_duration: Histogram
    etl_bytes_in: Counter
    etl_bytes_out: Counter
    etl_restarts: Counter
    etl_ready: Gauge
    xaction_objects: Counter
    xaction_bytes: Counter
    xaction_errors: Counter
    xaction_duration: Histogram
    xactions_running: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        r = registry if registry is not None else CollectorRegistry()
        etl = ["etl", "comm_type"]
        return cls(
            registry=r,
            http_requests=Counter("aisetl_http_requests", "HTTP requests served",
                                  ["role", "method", "route", "status"], registry=r),
            http_duration=Histogram("aisetl_http_request_duration_seconds",
                                    "Time to serve an HTTP request (headers to last byte)",
                                    ["role", "method", "route"], buckets=LATENCY_BUCKETS,
                                    registry=r),
            object_requests=Counter("aisetl_object_requests", "Object operations on targets",
                                    ["op"], registry=r),
            object_bytes=Counter("aisetl_object_bytes", "Object bytes read or written",
                                 ["op"], registry=r),
            etl_requests=Counter("aisetl_etl_requests", "Inline transform requests", etl,
                                 registry=r),
            etl_errors=Counter("aisetl_etl_errors", "Inline transform requests that failed",
                               etl, registry=r),
            etl_duration=Histogram("aisetl_etl_request_duration_seconds",
                                   "Time to transform one object inline", etl,
                                   buckets=LATENCY_BUCKETS, registry=r),
            etl_bytes_in=Counter("aisetl_etl_bytes_in", "Bytes sent to transformers", etl,
                                 registry=r),
            etl_bytes_out=Counter("aisetl_etl_bytes_out", "Bytes received from transformers",
                                  etl, registry=r),
            etl_restarts=Counter("aisetl_etl_transformer_restarts",
                                 "Transformer restarts after a crash", ["etl"], registry=r),
            etl_ready=Gauge("aisetl_etl_transformers_ready",
                            "Transformers of this target that are Ready", ["etl"], registry=r),
            xaction_objects=Counter("aisetl_xaction_objects", "Objects processed by jobs",
                                    ["kind"], registry=r),
            xaction_bytes=Counter("aisetl_xaction_bytes", "Bytes written (or counted, on a "
                                  "dry run) by jobs", ["kind"], registry=r),
            xaction_errors=Counter("aisetl_xaction_errors", "Per-object job errors",
                                   ["kind"], registry=r),
            xaction_duration=Histogram("aisetl_xaction_duration_seconds",
                                       "Duration of finished jobs on this target", ["kind"],
                                       buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
                                       registry=r),
            xactions_running=Gauge("aisetl_xactions_running", "Jobs running on this target",
                                   ["kind"], registry=r),
        )
