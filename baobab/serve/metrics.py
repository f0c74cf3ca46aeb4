"""Prometheus metrics of one server, in its own registry, every series labelled ``model``.

Counters and latency histograms are updated by the HTTP layer as outputs stream by; the
engine's gauges (requests running and waiting, KV-cache usage) are read from
``AsyncEngine.stats()`` at scrape time, so they are never stale.

=========================================  =========  ====================================
name                                       type       meaning
=========================================  =========  ====================================
baobab_requests_running                    gauge      requests holding KV cache
baobab_requests_waiting                    gauge      requests queued for admission
baobab_kv_cache_usage_ratio                gauge      fraction of KV-cache blocks in use
baobab_kv_cache_blocks_used / _total       gauge      KV-cache blocks in use / in all
baobab_prefix_cache_queries_total          counter    prompt tokens looked up in the cache
baobab_prefix_cache_hits_total             counter    of which found there (not computed)
baobab_spec_decode_drafts_total            counter    speculative verify steps (per request)
baobab_spec_decode_draft_tokens_total      counter    tokens proposed
baobab_spec_decode_accepted_tokens_total   counter    of which accepted
baobab_spec_decode_acceptance_ratio        gauge      accepted / proposed, since start-up
baobab_spec_decode_tokens_per_step         gauge      tokens a verify step emits, on average
baobab_prompt_tokens_total                 counter    prompt tokens admitted
baobab_generation_tokens_total             counter    tokens generated
baobab_requests_finished_total             counter    engine requests, by finish_reason
baobab_requests_rejected_total             counter    requests refused, by reason
baobab_time_to_first_token_seconds         histogram  arrival to first generated token
baobab_inter_token_latency_seconds         histogram  time between generated tokens
baobab_e2e_request_latency_seconds         histogram  arrival to last token (or answer)
baobab_images_classified_total             counter    images classified (image models)
baobab_explanations_pending                gauge      explanations queued or running
baobab_explanations_total                  counter    explanations answered, by outcome
baobab_explanation_seconds                 histogram  arrival to answer of an explanation
=========================================  =========  ====================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from baobab.serve.types import EngineStats

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip


class _EngineGauges(Collector):
    """Gauges (and the engine's own counters) read from the engine at each scrape (nothing
    while no model is loaded)."""

    def __init__(self, source: Callable[[], tuple[str, EngineStats] | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        current = self._source()
        if current is None:
            return
        model, stats = current
        spec = stats.spec
        gauges = (
            ("baobab_requests_running", "Requests holding KV cache.", stats.running),
            ("baobab_requests_waiting", "Requests queued for admission.", stats.waiting),
            ("baobab_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", stats.kv_cache_usage),
            ("baobab_kv_cache_blocks_used", "KV-cache blocks in use.", stats.kv_cache_blocks_used),
            ("baobab_kv_cache_blocks_total", "KV-cache blocks in all.", stats.kv_cache_blocks_total),
            ("baobab_spec_decode_acceptance_ratio", "Speculative tokens accepted / proposed.", spec.acceptance_rate),
            ("baobab_spec_decode_tokens_per_step", "Tokens per speculative verify step.", spec.tokens_per_step),
            ("baobab_explanations_pending", "Explanations queued or running.", stats.explanations),
        )  # fmt: skip
        counters = (  # the engine's own totals since start-up
            ("baobab_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
            ("baobab_prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
            ("baobab_spec_decode_drafts", "Speculative verify steps.", spec.drafts),
            ("baobab_spec_decode_draft_tokens", "Speculative tokens proposed.", spec.draft_tokens),
            ("baobab_spec_decode_accepted_tokens", "Speculative tokens accepted.", spec.accepted_tokens),
        )  # fmt: skip
        for kind, series in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, doc, value in series:
                family = kind(name, doc, labels=["model"])
                family.add_metric([model], float(value))
                yield family


class ServerMetrics:
    """The collectors of one app; :meth:`bind` labels them with the served model's name."""

    def __init__(self, stats: Callable[[], tuple[str, EngineStats] | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model"]
        self._prompt = Counter("baobab_prompt_tokens", "Prompt tokens admitted.", m, registry=r)
        self._generated = Counter("baobab_generation_tokens", "Tokens generated.", m, registry=r)
        self._finished = Counter(
            "baobab_requests_finished",
            "Engine requests finished.",
            [*m, "finish_reason"],
            registry=r,
        )
        self._rejected = Counter(
            "baobab_requests_rejected", "Requests refused.", [*m, "reason"], registry=r
        )
        self._images = Counter("baobab_images_classified", "Images classified.", m, registry=r)
        buckets = {"buckets": _LATENCY_BUCKETS, "registry": r}
        self._ttft = Histogram(
            "baobab_time_to_first_token_seconds", "Arrival to first token.", m, **buckets
        )
        self._itl = Histogram(
            "baobab_inter_token_latency_seconds", "Time between tokens.", m, **buckets
        )
        self._e2e = Histogram(
            "baobab_e2e_request_latency_seconds", "Arrival to last token or answer.", m, **buckets
        )
        self._explained = Counter(
            "baobab_explanations", "Explanations answered.", [*m, "outcome"], registry=r
        )
        self._explain_seconds = Histogram(
            "baobab_explanation_seconds", "Arrival to answer of an explanation.", m, **buckets
        )
        r.register(_EngineGauges(stats))
        self.model = ""

    def bind(self, model: str) -> None:
        """Label every series with ``model`` from now on."""
        self.model = model

    def prompt_tokens(self, count: int) -> None:
        self._prompt.labels(self.model).inc(count)

    def tokens(self, count: int, since_last: float | None) -> None:
        """``count`` new tokens; ``since_last``: seconds since the previous ones (None: first)."""
        self._generated.labels(self.model).inc(count)
        if since_last is not None and count:
            per_token = since_last / count  # an increment may carry several tokens
            for _ in range(count):
                self._itl.labels(self.model).observe(per_token)

    def first_token(self, seconds: float) -> None:
        self._ttft.labels(self.model).observe(seconds)

    def finished(self, finish_reason: str, seconds: float) -> None:
        self._finished.labels(self.model, finish_reason).inc()
        self._e2e.labels(self.model).observe(seconds)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model, reason).inc()

    def explained(self, outcome: str, seconds: float) -> None:
        """An explanation answered: "ok", "invalid", "aborted" or "failed"."""
        self._explained.labels(self.model, outcome).inc()
        self._explain_seconds.labels(self.model).observe(seconds)

    def classified(self, images: int, seconds: float) -> None:
        self._images.labels(self.model).inc(images)
        self._e2e.labels(self.model).observe(seconds)
