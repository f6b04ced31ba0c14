"""Prometheus metrics of every service, named ``t2i_*`` in base units.

Defined once here; each process exports the ones it updates (the gateway at ``/metrics``,
headless services through ``start_metrics_server``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Geometric buckets (x2) from 1 ms to ~4.5 min: covers control-plane overhead and SDXL jobs.
LATENCY_BUCKETS = tuple(0.001 * 2**i for i in range(19))

REQUESTS = Counter("t2i_requests_total", "HTTP requests", ["route", "code"])
JOBS = Counter("t2i_jobs_total", "Jobs reaching a terminal state", ["tier", "status"])
QUEUE_WAIT = Histogram("t2i_queue_wait_seconds", "Enqueue to worker start", ["tier"],
                       buckets=LATENCY_BUCKETS)
INFERENCE = Histogram("t2i_inference_seconds", "Worker start to result stored", ["tier"],
                      buckets=LATENCY_BUCKETS)
E2E = Histogram("t2i_e2e_seconds", "Enqueue to result stored", ["tier"],
                buckets=LATENCY_BUCKETS)
CLASSIFY = Histogram("t2i_classifier_seconds", "Classifier decision time per batch",
                     buckets=LATENCY_BUCKETS)
BACKLOG = Gauge("t2i_backlog_jobs", "Accepted jobs not yet terminal")
STREAM_LENGTH = Gauge("t2i_stream_length", "Entries in a tier stream", ["tier"])
STREAM_LAG = Gauge("t2i_stream_lag", "Entries not yet delivered to the group", ["tier"])
STREAM_PENDING = Gauge("t2i_stream_pending", "Delivered, unacknowledged entries", ["tier"])
GPUS = Gauge("t2i_gpus_allocated", "Workers assigned to a tier by the plan", ["tier"])
LOOP = Gauge("t2i_controller_loop_duration_seconds", "Controller loop phase time", ["phase"])
WORKER_BUSY = Gauge("t2i_worker_busy", "1 while the worker generates", ["worker"])
RECLAIMED = Counter("t2i_reclaimed_total", "Stream entries reclaimed from dead consumers",
                    ["stream"])
DEAD_LETTERS = Counter("t2i_dead_letters_total", "Entries moved to the dead-letter stream",
                       ["stream"])
MODEL_SWITCHES = Counter("t2i_model_switches_total", "Model loads by workers", ["model"])
MODEL_LOAD = Histogram("t2i_model_load_seconds", "Model load time", ["model"],
                       buckets=LATENCY_BUCKETS)


def start_metrics_server(port: int) -> None:
    """Serve ``/metrics`` on ``port`` (0 = disabled)."""
    if port:
        start_http_server(port)
