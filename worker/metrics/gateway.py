"""Request metrics as clients see them, recorded once per request when it ends."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from worker.gateway.context import RequestContext
from worker.gateway.hooks import ObservingHook
from worker.metrics.economics import ChargeOf, RequestEconomics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)


class GatewayMetrics(ObservingHook):
    """A request hook that observes every finished request; `charge_micro` gives its charge (billing's
    pricing), for the revenue counter."""

    def __init__(self, registry: CollectorRegistry, *, charge_micro: ChargeOf) -> None:
        self.requests = Counter("worker_requests", "Inference requests by model, endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=registry)
        self.ttft = Histogram("worker_request_ttft_seconds", "Time to first byte of the answer, as clients see it",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.inter_token = Histogram("worker_request_inter_token_seconds",
                                     "Mean gap between streamed events of a request, as clients see it",
                                     ["model"], buckets=_ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("worker_request_e2e_seconds", "Whole request duration, as clients see it",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.output_tokens = Counter("worker_output_tokens", "Completion tokens served", ["model"],
                                     registry=registry)
        self.prompt_tokens = Counter("worker_prompt_tokens", "Prompt tokens served (cached ones included)", ["model"],
                                     registry=registry)
        self.economics = RequestEconomics(registry, charge_micro)

    async def finalize(self, ctx: RequestContext) -> None:
        model = ctx.model.id
        self.requests.labels(model, ctx.endpoint, str(ctx.status_code or 0)).inc()
        self.economics.observe(ctx)
        if ctx.status_code != 200 or ctx.finished_monotonic is None:
            return
        self.e2e.labels(model).observe(ctx.finished_monotonic - ctx.started_monotonic)
        if ctx.first_byte_monotonic is not None:
            self.ttft.labels(model).observe(ctx.first_byte_monotonic - ctx.started_monotonic)
            if ctx.stream and ctx.streamed_events > 2:
                gaps = ctx.streamed_events - 1
                self.inter_token.labels(model).observe((ctx.finished_monotonic - ctx.first_byte_monotonic) / gaps)
        if ctx.usage is not None:
            self.output_tokens.labels(model).inc(ctx.usage.completion_tokens)
            self.prompt_tokens.labels(model).inc(ctx.usage.prompt_tokens)
