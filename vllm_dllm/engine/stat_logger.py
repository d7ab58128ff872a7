"""vLLM's Prometheus stat logger plus the dLLM series (the `vllm.stat_logger_plugins` entry).

vLLM uses a custom `PrometheusStatLogger` in place of its own, so this subclass keeps
every standard `vllm:` series and adds, for engines running the dLLM scheduler:

- `vllm:dllm_request_iterations` (histogram): denoising iterations per request,
  observed when the request leaves the engine (finished or aborted);
- `vllm:dllm_iteration_committed_tokens` (histogram): tokens one request's
  iteration committed; its `_count` is the number of request iterations;
- `vllm:dllm_iteration_recomputed_rows` (histogram): rows one request's iteration
  recomputed (its whole sequence without a cache, less under `prefix` / `dual`);
- `vllm:dllm_requests_by_block` (gauge, label `block`): running requests per
  block of their canvas.

Its `log()` adds one line to vLLM's periodic stats log with the same numbers.
"""

from collections import Counter

from prometheus_client import Gauge, Histogram

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.metrics.buckets import build_1_2_5_buckets
from vllm.v1.metrics.loggers import PrometheusStatLogger
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats
from vllm.v1.metrics.utils import create_metric_per_engine

from vllm_dllm.engine.stats import DllmStats

# Under "vllm", the logger vLLM configures, so the line shows beside vLLM's own.
logger = init_logger(f"vllm.{__name__}")

DLLM_SCHEDULER = "vllm_dllm.engine.scheduler.DllmScheduler"


class DllmPrometheusStatLogger(PrometheusStatLogger):
    def __init__(self, vllm_config: VllmConfig, engine_indexes: list[int] | None = None):
        super().__init__(vllm_config, engine_indexes)
        self.dllm = vllm_config.scheduler_config.scheduler_cls == DLLM_SCHEDULER
        if not self.dllm:
            return
        labelnames = ["model_name", "engine"]
        max_len = vllm_config.model_config.max_model_len

        def histogram(name: str, documentation: str, buckets: list[float]) -> dict:
            return create_metric_per_engine(
                Histogram(name=name, documentation=documentation, buckets=buckets,
                          labelnames=labelnames), self.per_engine_labelvalues)

        self.histogram_request_iterations = histogram(
            "vllm:dllm_request_iterations",
            "Denoising iterations a request ran before it left the engine.",
            build_1_2_5_buckets(max_len))
        self.histogram_committed = histogram(
            "vllm:dllm_iteration_committed_tokens",
            "Tokens one request's denoising iteration committed.",
            [0] + build_1_2_5_buckets(max_len))
        self.histogram_rows = histogram(
            "vllm:dllm_iteration_recomputed_rows",
            "Rows (positions) one request's denoising iteration recomputed.",
            build_1_2_5_buckets(max_len))
        self.gauge_by_block = Gauge(
            name="vllm:dllm_requests_by_block",
            documentation="Running requests per block of their canvas.",
            labelnames=labelnames + ["block"], multiprocess_mode="mostrecent")
        self.blocks_seen: dict[int, set[int]] = {i: set() for i in self.per_engine_labelvalues}
        # Since the last log line.
        self.interval = DllmStats()
        self.last_blocks: Counter = Counter()

    def record(self, scheduler_stats: SchedulerStats | None,
               iteration_stats: IterationStats | None,
               mm_cache_stats: MultiModalCacheStats | None = None, engine_idx: int = 0):
        super().record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)
        if not self.dllm or scheduler_stats is None:
            return
        stats = DllmStats.from_wire(scheduler_stats.running_lora_adapters)
        if stats is None:
            return
        for series, histogram in ((stats.request_iterations, self.histogram_request_iterations),
                                  (stats.committed, self.histogram_committed),
                                  (stats.rows, self.histogram_rows)):
            for value, count in series.items():
                for _ in range(count):
                    histogram[engine_idx].observe(value)
        labels = self.per_engine_labelvalues[engine_idx]
        seen = self.blocks_seen[engine_idx]
        seen.update(stats.block)
        for block in seen:
            self.gauge_by_block.labels(*labels, str(block)).set(stats.block.get(block, 0))
        for name in ("committed", "rows", "request_iterations"):
            getattr(self.interval, name).update(getattr(stats, name))
        self.last_blocks = stats.block

    def log(self):
        super().log()
        if not self.dllm:
            return
        stats, self.interval = self.interval, DllmStats()
        iterations = stats.iterations
        finished = sum(stats.request_iterations.values())
        log_fn = logger.info if iterations or finished else logger.debug
        log_fn("dLLM: %d request iterations, %.2f committed tokens / iteration, "
               "%.1f recomputed rows / iteration, %d requests left after %.1f iterations "
               "each, running requests by block: %s",
               iterations, _mean(stats.committed), _mean(stats.rows), finished,
               _mean(stats.request_iterations), dict(sorted(self.last_blocks.items())))


def _mean(series: Counter) -> float:
    count = sum(series.values())
    return sum(v * c for v, c in series.items()) / count if count else 0.0
