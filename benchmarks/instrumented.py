"""An in-process vLLM engine the harness can see into: per-request model iterations,
recomputed rows, CPU time and load, for one batch of requests at a time.

vLLM is imported only when an `Engine` is built, so that the harness can set vLLM's
environment variables first.
"""

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import configs as cfgs


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(f"[harness {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class RequestResult:
    token_ids: list[int]
    finish_reason: str | None
    finished_at: float  # seconds after the batch was submitted
    iterations: int


@dataclass
class BatchResult:
    status: str = "ok"  # ok | skipped (rejected at admission) | failed (error while running)
    error: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time (user + system) over the batch
    engine_steps: int = 0
    model_rows: int | None = None  # token positions run through the model, all requests
    load_average: float | None = None  # 1-minute load average when the batch started
    requests: dict[str, RequestResult] = field(default_factory=dict)
    resolved_extra_args: dict[str, Any] | None = None


# The bundled checkpoints are float32, as are the reference decoders and every number in
# BENCHMARKS.md; vLLM's `--dtype auto` would cast them to bfloat16.
DTYPE = "float32"


class Engine:
    """An in-process vLLM engine whose scheduler is watched, so that every request's
    model iterations (engine steps that scheduled it) can be counted.

    The same watch sums the rows the scheduler charges each request (its recompute
    window: the token positions the model runs, which the KV cache modes shrink) into
    `BatchResult.model_rows`, None when nothing was charged. `layer_rows()` reads the
    per-layer rows the model runner counts, which token skipping shrinks.
    """

    def __init__(self, model: str | Path, *, max_model_len: int, max_num_seqs: int,
                 threads: int = 0, seed: int = 0, **engine_args: Any):
        # The engine core must run in this process for the scheduler to be reachable.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch
        from vllm import LLM

        if threads > 0:
            # Before the worker starts: vLLM's CPU worker forbids changing it afterwards.
            torch.set_num_threads(threads)

        self.llm = LLM(model=str(model), max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, seed=seed,
                       **{"dtype": DTYPE, **engine_args})
        self.engine = self.llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.iterations: Counter[str] = Counter()
        self.resolved: dict[str, dict] = {}
        self.steps = 0
        self.rows = 0
        original = self.scheduler.schedule

        def schedule(*args, **kwargs):
            out = original(*args, **kwargs)
            if out.num_scheduled_tokens:
                self.steps += 1
            # The scheduler charges each request the rows it recomputes.
            self.rows += out.total_num_scheduled_tokens
            for request_id in out.num_scheduled_tokens:
                external = request_id.rsplit("-", 1)[0]  # vLLM appends "-<8 chars>"
                self.iterations[external] += 1
                if external not in self.resolved:
                    request = self.scheduler.requests.get(request_id)
                    if request is not None and request.sampling_params is not None:
                        self.resolved[external] = dict(request.sampling_params.extra_args or {})
            return out

        self.scheduler.schedule = schedule
        self.threads = torch.get_num_threads()

    def layer_rows(self) -> dict[str, list[int]] | None:
        """Query rows, rows with exact attention and FFN rows the model runner computed
        per layer so far (None if it cannot be read)."""
        try:
            worker = self.engine.engine_core.engine_core.model_executor.driver_worker.worker
            runner = worker.model_runner
            return {"query": list(runner.layer_rows),
                    "attention": list(runner.layer_attention_rows),
                    "ffn": list(runner.layer_ffn_rows)}
        except AttributeError:
            return None

    def run(self, requests: list[tuple[str, list[int], Any]]) -> BatchResult:
        """Submit every (request_id, prompt_token_ids, SamplingParams) at once and step
        the engine until all have finished."""
        result = BatchResult()
        steps_before, rows_before = self.steps, self.rows
        added: list[str] = []
        result.load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        cpu_start = time.process_time()
        start = time.perf_counter()
        try:
            for request_id, prompt, params in requests:
                self.engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
                added.append(request_id)
        except Exception as e:  # noqa: BLE001 - the plugin's validation error, reported
            self._abort(added)
            result.status = "skipped" if not added else "failed"
            result.error = f"{type(e).__name__}: {e}"
            return result
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        completion = out.outputs[0]
                        result.requests[out.request_id] = RequestResult(
                            list(completion.token_ids), completion.finish_reason,
                            time.perf_counter() - start, 0)
        except Exception as e:  # noqa: BLE001 - keep the other configurations running
            self._abort([r for r in added if r not in result.requests])
            result.status = "failed"
            result.error = f"{type(e).__name__}: {e}"
            return result
        result.wall_s = time.perf_counter() - start
        result.cpu_s = time.process_time() - cpu_start
        result.engine_steps = self.steps - steps_before
        if self.rows > rows_before:
            result.model_rows = self.rows - rows_before
        for request_id, r in result.requests.items():
            r.iterations = self.iterations[request_id]
        if requests:
            result.resolved_extra_args = self.resolved.get(requests[0][0])
        return result

    def _abort(self, request_ids: list[str]) -> None:
        if request_ids:
            try:
                self.engine.abort_request(request_ids)
                while self.engine.has_unfinished_requests():
                    self.engine.step()
            except Exception:  # noqa: BLE001
                pass


def sampling_params(extra_args: dict, *, ignore_eos: bool = False) -> Any:
    """Greedy SamplingParams whose max_tokens is the canvas (`gen_length`)."""
    from vllm import SamplingParams

    gen_length = extra_args.get("gen_length", cfgs.ACCURACY_GEN_LENGTH)
    return SamplingParams(temperature=0.0, max_tokens=gen_length, ignore_eos=ignore_eos,
                          extra_args=dict(extra_args))


def model_max_len(model: Path, wanted: int | None) -> int:
    """`wanted`, else 1024, capped at the checkpoint's context (LLaDA's
    max_sequence_length, the others' max_position_embeddings)."""
    config = json.loads((model / "config.json").read_text())
    limit = int(config.get("max_sequence_length", config.get("max_position_embeddings", 4096)))
    return min(limit, wanted) if wanted else min(limit, 1024)
