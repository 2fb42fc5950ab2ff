"""The engine's Prometheus metrics under vLLM's names and labels, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM 0.32's default buckets for these histograms.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                            120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
_ENGINE_INDEX = "0"


class EngineMetrics:
    """What the scheduler reports each step, exposed as vLLM's `/metrics` text."""

    def __init__(self, model_name: str, block_size: int, num_gpu_blocks: int, prefix_caching: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model_name", "engine")
        values = (model_name, _ENGINE_INDEX)
        reg = self.registry
        self._running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                              labels, registry=reg).labels(*values)
        self._waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                              labels, registry=reg).labels(*values)
        self._kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                               labels, registry=reg).labels(*values)
        cache_info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                           ("block_size", "num_gpu_blocks", "enable_prefix_caching", "engine"), registry=reg)
        cache_info.labels(str(block_size), str(num_gpu_blocks), str(prefix_caching), _ENGINE_INDEX).set(1)
        # Tokens, as vLLM 0.32 counts them (vllm/v1/metrics/loggers.py): prompt tokens looked up in the
        # prefix cache when a request is scheduled, and how many of them were found there.
        self._prefix_queries = Counter("vllm:prefix_cache_queries",
                                       "Prefix cache queries, in terms of number of queried tokens.",
                                       labels, registry=reg).labels(*values)
        self._prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                                    labels, registry=reg).labels(*values)
        self._preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                    labels, registry=reg).labels(*values)
        self._prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                      labels, registry=reg).labels(*values)
        self._generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                          labels, registry=reg).labels(*values)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          (*labels, "finished_reason"), registry=reg)
        self._success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        self._ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                               labels, buckets=_TTFT_BUCKETS, registry=reg).labels(*values)
        self._itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                              labels, buckets=_ITL_BUCKETS, registry=reg).labels(*values)
        self._e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                              labels, buckets=_REQUEST_LATENCY_BUCKETS, registry=reg).labels(*values)
        self._queue = Histogram("vllm:request_queue_time_seconds",
                                "Histogram of time spent in WAITING phase for request.",
                                labels, buckets=_REQUEST_LATENCY_BUCKETS, registry=reg).labels(*values)
        # Not a vLLM metric: the mock's own measured step time, what its requests' gpu_seconds sum to.
        self._busy = Counter("mock:engine_busy_seconds", "Seconds the engine spent computing steps.",
                             labels, registry=reg).labels(*values)

    def set_load(self, running: int, waiting: int, kv_usage: float) -> None:
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv_usage.set(kv_usage)

    def scheduled_first_time(self, queue_seconds: float) -> None:
        self._queue.observe(queue_seconds)

    def prompt_done(self, prompt_tokens: int, ttft_seconds: float | None) -> None:
        self._prompt_tokens.inc(prompt_tokens)
        if ttft_seconds is not None:
            self._ttft.observe(ttft_seconds)

    def generated(self, tokens: int) -> None:
        self._generation_tokens.inc(tokens)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def prefix_cache_queried(self, queried_tokens: int, hit_tokens: int) -> None:
        self._prefix_queries.inc(queried_tokens)
        self._prefix_hits.inc(hit_tokens)

    def busy(self, seconds: float) -> None:
        self._busy.inc(seconds)

    def preempted(self) -> None:
        self._preemptions.inc()

    def finished(self, reason: str, e2e_seconds: float) -> None:
        self._success[reason].inc()
        self._e2e.observe(e2e_seconds)

    def render(self, names: list[str] | None = None) -> bytes:
        """The page, or only the samples named (as prometheus_client's exporter answers `name[]`)."""
        return generate_latest(self.registry if names is None else self.registry.restricted_registry(names))
