"""The server's Prometheus metrics, in a registry of its own (GET /metrics)."""
from jax import monitoring
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)

# Every program JAX lowers raises this event once, whether XLA then compiles it or the persistent cache
# has it: the count of programs made, so a shape the start-up missed shows up as a new one.
_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"


class Metrics:
    def __init__(self):
        disable_created_metrics()  # the *_created samples would double /metrics for nothing a dashboard reads
        r = self.registry = CollectorRegistry()
        self.requests = Counter("serve_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("serve_request_latency_seconds", "Request latency, arrival to last byte",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("serve_time_to_first_token_seconds", "Queue + prefill + first chunk",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("serve_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("serve_prompt_tokens", "Prompt tokens read", registry=r)
        self.queue_depth = Gauge("serve_queue_depth", "Requests waiting for a slot or a batch", registry=r)
        self.batch_size = Histogram("serve_batch_size", "Sequences per decode chunk, or rows per predict batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.compiles = Counter("serve_compiles", "Programs JAX compiled (or loaded from its cache)", ["phase"],
                                registry=r)
        self.phase = "startup"
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == _LOWERED:
            self.compiles.labels(self.phase).inc()

    def ready(self) -> None:
        """From now on, compiles count as `serving` ones: after start-up there should be none."""
        self.phase = "serving"
        self.compiles.labels("serving").inc(0)
