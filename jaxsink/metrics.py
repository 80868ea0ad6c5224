"""`GET /metrics` of `jaxsink serve`: Prometheus text from the server's own registry.

The request, token and latency series are updated once per request or per text event by the
server's event loop, never by the scheduler thread, so the decode loop pays nothing for them.
The scheduler's state (rows, queue, prompt cache, sessions) is read from its `stats()` only
when the metrics are scraped. Each app has its own `CollectorRegistry`, so several servers in
one process (as in tests) do not share series.

Why prometheus-client: it is the Prometheus project's own Python library, writing the text
format that every scraper reads, with its histograms and label escaping right.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds from a request's arrival to its first token: a warm 135M model on a CPU answers in
# tens of milliseconds, a long prompt or a full queue in seconds
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# the scheduler's stats(): (key, metric name, help), gauges then counters
STATE_GAUGES = (
    ("rows", "jaxsink_rows", "rows the engine decodes together (--max-batch)"),
    ("rows_decoding", "jaxsink_rows_live", "rows decoding a reply"),
    ("rows_prefilling", "jaxsink_rows_prefilling", "rows feeding a prompt"),
    ("rows_parked", "jaxsink_rows_parked", "rows holding an idle session's stream"),
    ("queued", "jaxsink_queue_length", "requests waiting for a row"),
    ("sessions", "jaxsink_sessions", "sessions this server knows"),
    ("prompt_cache_entries", "jaxsink_prompt_cache_entries", "stream states in the prompt cache"),
    ("prompt_cache_bytes", "jaxsink_prompt_cache_bytes", "host bytes the prompt cache holds"),
    ("prompt_cache_max_bytes", "jaxsink_prompt_cache_max_bytes", "the prompt cache's bound"),
)
STATE_COUNTERS = (
    ("prompt_cache_hits", "jaxsink_prompt_cache_hits", "requests started from a cached state"),
    ("prompt_cache_misses", "jaxsink_prompt_cache_misses", "requests no cached state served"),
    ("prompt_cache_evictions", "jaxsink_prompt_cache_evictions", "states evicted for room"),
    ("sessions_saved", "jaxsink_sessions_saved", "session streams saved to disk"),
    ("sessions_restored", "jaxsink_sessions_restored", "session streams restored from disk"),
)
STEP_KINDS = ("prefill", "mixed", "decode")


class SchedulerCollector:
    """The scheduler's state at scrape time, from `stats()` (a dict as `Scheduler.stats`)."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        for key, name, doc in STATE_GAUGES:
            yield GaugeMetricFamily(name, doc, value=stats[key])
        for key, name, doc in STATE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=stats[key])
        steps = CounterMetricFamily("jaxsink_steps", "device steps run, by kind", labels=["kind"])
        for kind in STEP_KINDS:
            steps.add_metric([kind], stats[f"steps_{kind}"])
        yield steps


class ServerMetrics:
    """Every series of one server, in a registry of its own."""

    def __init__(self, stats: Callable[[], dict]):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "jaxsink_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "jaxsink_prompt_tokens", "prompt tokens of accepted requests", registry=registry
        )
        self.cached_tokens = Counter(
            "jaxsink_cached_tokens",
            "prompt tokens a cached stream state spared feeding",
            registry=registry,
        )
        self.completion_tokens = Counter(
            "jaxsink_completion_tokens", "tokens generated", registry=registry
        )
        self.ttft = Histogram(
            "jaxsink_time_to_first_token_seconds",
            "seconds from a request's arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.decode_rate = Gauge(
            "jaxsink_decode_tokens_per_second",
            "the last finished request's decode speed: its tokens after the first over the "
            "seconds since the first",
            registry=registry,
        )
        registry.register(SchedulerCollector(stats))

    def exposition(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """One request's token counts and times, reported to `ServerMetrics` as its events come."""

    def __init__(self, metrics: ServerMetrics, arrived: float):
        self.metrics, self.arrived = metrics, arrived
        self.first: float | None = None
        self.tokens = 0

    def accepted(self, prompt_tokens: int) -> None:
        self.metrics.prompt_tokens.inc(prompt_tokens)

    def generated(self, tokens: int, now: float) -> None:
        if not tokens:
            return
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.arrived)
        self.tokens += tokens
        self.metrics.completion_tokens.inc(tokens)

    def done(self, cached_tokens: int, now: float) -> None:
        self.metrics.cached_tokens.inc(cached_tokens)
        if self.first is not None and self.tokens > 1 and now > self.first:
            self.metrics.decode_rate.set((self.tokens - 1) / (now - self.first))


class CountRequests:
    """ASGI middleware counting each HTTP request by `endpoint(scope)` and its status (500
    when the app failed before answering)."""

    def __init__(self, app, metrics: ServerMetrics, endpoint: Callable[[dict], str]):
        self.app, self.metrics, self.endpoint = app, metrics, endpoint

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(self.endpoint(scope), str(status)).inc()
