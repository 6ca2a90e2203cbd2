"""Prometheus metrics of the gateway, plus gauges read from Redis at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker_worker.protocol.messages import WorkerHealth


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "HTTP generation requests by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self.jobs = Counter(
            "gateway_jobs", "Jobs streamed by model and terminal outcome", ["model", "outcome"], registry=r
        )
        self.resumes = Counter(
            "gateway_job_resumes", "Jobs continued by another worker (reclaims, hand-backs)", ["model"], registry=r
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Submit to first text",
            ["model"],
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tokens_per_s = Histogram(
            "gateway_job_tokens_per_second",
            "Completion tokens per second of a job",
            ["model"],
            registry=r,
            buckets=(1, 5, 10, 25, 50, 100, 200, 500, 1000, 5000),
        )
        self.unreplicated = Counter(
            "gateway_unreplicated_writes",
            "Jobs (what=job) or their images (what=images) queued without the --min-replicas-ack acknowledgement",
            ["model", "what"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "broker_queue_depth", "Interactive jobs queued or running per model", ["model"], registry=r
        )
        self.batch_queue_depth = Gauge(
            "broker_batch_queue_depth", "Batch-lane jobs queued or running per model", ["model"], registry=r
        )
        self.live_workers = Gauge("broker_live_workers", "Workers with a fresh heartbeat", ["model"], registry=r)
        self.worker_tokens = Gauge(
            "broker_worker_tokens_per_second", "Tokens/s reported by workers", ["model"], registry=r
        )
        self.dead_letters = Gauge("broker_dead_letters", "Entries in the dead-letter stream", registry=r)
        self.redis_up = Gauge("broker_redis_up", "1 when Redis answered the last scrape", registry=r)
        self.pubsub_channels = Gauge(
            "gateway_pubsub_channels", "Job channels this gateway's streams are subscribed to", registry=r
        )
        self.job_readers = Gauge("gateway_job_readers", "Streams of this gateway registered as job readers", registry=r)

    def count_unreplicated(self, model: str, what: str) -> None:
        self.unreplicated.labels(model, what).inc()

    def set_workers(self, workers: list[WorkerHealth], queues: dict[str, int]) -> None:
        self.live_workers.clear()
        self.worker_tokens.clear()
        for w in workers:
            self.live_workers.labels(w.model).inc()
            self.worker_tokens.labels(w.model).inc(w.tokens_per_s)
        self.queue_depth.clear()
        for model, depth in queues.items():
            self.queue_depth.labels(model).set(depth)

    def set_batch(self, queues: dict[str, int]) -> None:
        self.batch_queue_depth.clear()
        for model, depth in queues.items():
            self.batch_queue_depth.labels(model).set(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
