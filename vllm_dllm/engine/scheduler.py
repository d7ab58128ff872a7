"""Iteration-level scheduling for diffusion LMs.

One engine step is one denoising iteration of every running request. A request
is admitted once vLLM's KV cache manager can give it pages for its whole
sequence (prompt + canvas); it keeps them until it finishes, is aborted or is
preempted. Requests join and leave between iterations, each at its own block
and step. Stop checks, outputs and stats are vLLM's own (`update_from_output`):
the worker reports, each iteration, the canvas tokens that became final.

The token budget (`max_num_batched_tokens`) is charged with the rows each
request really recomputes: its whole sequence when it joins or resumes, then
what the runner reported for its next iteration (a block or block + suffix
under the prefix and dual caches). vLLM's token statistics then count real work.

Structured outputs follow vLLM's conventions: the engine core compiles a request's
grammar (`StructuredOutputManager`) and the request waits until it is ready; each
iteration `get_grammar_bitmask` gives the runner the token masks of the request's
frontier and of the positions after it that its drafts lead to (the single token a
mask allows, else the last iteration's prediction; `sampling/grammar.py`), and
`update_from_output` advances the grammar with the returned tokens (vLLM's own
`accept_tokens`).

With stats on, the scheduler also counts what each iteration did (tokens committed,
rows recomputed), iterations per request and requests per block
(`engine/stats.py`); they reach the front end with vLLM's `SchedulerStats`.
"""

import math
import time
from dataclasses import dataclass, field

import torch

from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.output import (CachedRequestData, GrammarOutput, NewRequestData,
                                       SchedulerOutput)
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreEventType
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from vllm_dllm.engine.stats import DllmStats
from vllm_dllm.model_executor.registry import BY_ARCHITECTURE
from vllm_dllm.params import DllmParams
from vllm_dllm.sampling.blocks import BlockGrid, block_grid


@dataclass
class Progress:
    """What the scheduler knows of one request's decoding."""

    grid: BlockGrid
    # The rows its next iteration recomputes, as the runner reported them
    # (`RequestState.rows`); None until it has run or after preemption.
    next_rows: int | None = None
    iterations: int = 0
    block: int = 0
    # A structured request's predictions from its frontier on (the runner's last report).
    drafts: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.grid.refresh_rows(self.block) if self.next_rows is None else self.next_rows


@dataclass
class DllmGrammarOutput(GrammarOutput):
    """vLLM's grammar masks with what a canvas also needs: per structured request, the
    tokens its masks after the first were built on (`drafts`, one fewer than its rows)
    and which of its rows allow a single token (`forced`)."""

    drafts: list[list[int]] = field(default_factory=list)
    forced: list[list[bool]] = field(default_factory=list)


class DllmScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._progress: dict[str, Progress] = {}
        self._block_causal = BY_ARCHITECTURE[self.vllm_config.model_config.architecture].block_causal
        # Stats since the last `make_stats`.
        self._dllm_stats = DllmStats()

    def add_request(self, request: Request) -> None:
        params = DllmParams.from_wire(request.sampling_params.extra_args)
        grid = block_grid(request.num_prompt_tokens, params, self._block_causal)
        self._progress[request.request_id] = Progress(grid)
        super().add_request(request)

    def _free_request(self, request: Request, *args, **kwargs):
        progress = self._progress.pop(request.request_id, None)
        if progress is not None and progress.iterations:
            self._dllm_stats.request_iterations[progress.iterations] += 1
        return super()._free_request(request, *args, **kwargs)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        budget = self.max_num_scheduled_tokens
        now = time.monotonic()
        num_scheduled: dict[str, int] = {}
        scheduled: list[Request] = []
        skipped: list[Request] = []
        for request in self.running:
            rows = self._progress[request.request_id].rows
            if rows <= budget:
                num_scheduled[request.request_id] = rows
                scheduled.append(request)
                budget -= rows
            else:
                skipped.append(request)

        admitted: list[Request] = []
        # Requests whose grammar is still compiling wait without holding up the others.
        compiling: list[Request] = []
        while self.waiting and len(self.running) < self.max_num_running_reqs:
            request = self.waiting.peek_request()
            if (self._is_blocked_waiting_status(request.status)
                    and not self._handle_blocked_waiting_request(request)):
                compiling.append(self.waiting.pop_request())
                continue
            # A new or resumed request recomputes what its pages lack first.
            progress = self._progress[request.request_id]
            hit, cached = self._cached_prefix(request, progress.grid)
            rows = progress.rows - cached
            if rows > budget:
                break
            if self.kv_cache_manager.allocate_slots(
                    request, progress.grid.sequence_length - cached, cached, hit,
                    delay_cache_blocks=True) is None:
                victim = self._lower_priority_victim(request)
                if victim is None:
                    break
                self.running.remove(victim)
                if victim.request_id in num_scheduled:
                    budget += num_scheduled.pop(victim.request_id)
                    scheduled.remove(victim)
                skipped = [r for r in skipped if r is not victim]
                self._progress[victim.request_id].next_rows = None
                self._preempt_request(victim, now)
                continue
            if hit is not None:
                # The pages of whole prompt blocks hold exact K/V once this iteration
                # wrote them; other requests of the same pass read them after that
                # write, layer by layer.
                exact = progress.grid.origin // self.block_size * self.block_size
                self.kv_cache_manager.cache_blocks(request, exact)
                # vLLM's own prefix-cache counters (`vllm:prefix_cache_hits`).
                self.kv_cache_manager.record_prefix_cache_stats(request, cached)
            self.waiting.pop_request()
            self.running.append(request)
            admitted.append(request)
            # vLLM's prompt-token stats count a prompt once, at its first admission.
            if request.prefill_stats and request.num_preemptions <= 0:
                request.prefill_stats.set(num_prompt_tokens=request.num_prompt_tokens,
                                          num_local_cached_tokens=cached,
                                          num_external_cached_tokens=0)
            request.num_computed_tokens = cached
            num_scheduled[request.request_id] = rows
            budget -= rows
            if self.log_stats:
                request.record_event(EngineCoreEventType.SCHEDULED, now)

        new_reqs: list[NewRequestData] = []
        resumed: list[Request] = []
        for request in admitted:
            if request.status == RequestStatus.PREEMPTED:
                resumed.append(request)
            else:
                new_reqs.append(NewRequestData.from_request(
                    request, self.kv_cache_manager.get_block_ids(request.request_id)))
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens += num_scheduled[request.request_id]

        self.waiting.prepend_requests(compiling)
        # Requests that had to sit out this iteration go first next time.
        self.running = skipped + [r for r in self.running if r not in skipped]
        for request_id, rows in num_scheduled.items():
            self.requests[request_id].num_in_flight_tokens += rows

        cached = scheduled + resumed
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=CachedRequestData(
                req_ids=[r.request_id for r in cached],
                resumed_req_ids={r.request_id for r in resumed},
                new_token_ids=[[] for _ in cached],
                all_token_ids={},
                new_block_ids=[
                    self.kv_cache_manager.get_block_ids(r.request_id) if r in resumed else None
                    for r in cached
                ],
                num_computed_tokens=[r.num_computed_tokens for r in cached],
                num_output_tokens=[r.num_output_tokens for r in cached],
            ),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=[],
            preempted_req_ids=self.reset_preempted_req_ids,
            has_structured_output_requests=any(
                self.requests[r].use_structured_output for r in num_scheduled),
        )
        self.finished_req_ids = set()
        self.reset_preempted_req_ids = set()
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput):
        blocks = getattr(model_runner_output, "dllm_block", {})
        for request_id, rows in getattr(model_runner_output, "dllm_next_rows", {}).items():
            if request_id in self._progress:
                self._progress[request_id].next_rows = rows
                self._progress[request_id].block = blocks[request_id]
        for request_id, drafts in getattr(model_runner_output, "dllm_drafts", {}).items():
            if request_id in self._progress:
                self._progress[request_id].drafts = drafts
        if self.log_stats:
            self._count_iterations(scheduler_output, model_runner_output)
        return super().update_from_output(scheduler_output, model_runner_output)

    def get_grammar_bitmask(self, scheduler_output: SchedulerOutput
                            ) -> DllmGrammarOutput | None:
        """Per scheduled structured request, the grammar's masks at its frontier and at
        each position after it, to the end of its block, while a draft leads there: the
        one token the last mask allows, else the request's prediction there, if the
        grammar accepts it. A terminated grammar allows only the model's EOS, the pad
        that fills the rest of the canvas."""
        if not scheduler_output.has_structured_output_requests:
            return None
        ids = [r for r in scheduler_output.num_scheduled_tokens
               if self.requests[r].use_structured_output]
        backend = self.structured_output_manager.backend
        eos = self.vllm_config.model_config.hf_config.eos_token_id
        masks, drafts, forced = [], [], []
        for request_id in ids:
            request = self.requests[request_id]
            grammar = request.structured_output_request.grammar
            progress = self._progress[request_id]
            grid = progress.grid
            frontier = request.num_prompt_tokens + request.num_output_tokens
            room = grid.block_length - (frontier - grid.origin) % grid.block_length
            bitmask = backend.allocate_token_bitmask(room)
            assumed, single_rows, accepted = [], [], 0
            for i in range(room):
                if grammar.is_terminated():
                    bitmask[i] = 0
                    bitmask[i, eos // 32] = _bit(eos % 32)
                else:
                    grammar.fill_bitmask(bitmask, i)
                single = _single_token(bitmask[i])
                single_rows.append(single is not None)
                draft = single if single is not None else (
                    progress.drafts[i] if i < len(progress.drafts) else None)
                if draft is None or i + 1 == room:
                    break
                if grammar.is_terminated():
                    if draft != eos:
                        break
                elif grammar.validate_tokens([draft]):
                    grammar.accept_tokens(request_id, [draft])
                    accepted += 1
                else:
                    break
                assumed.append(draft)
            if accepted:
                grammar.rollback(accepted)
            masks.append(bitmask[: len(single_rows)])
            drafts.append(assumed)
            forced.append(single_rows)
        return DllmGrammarOutput(ids, torch.cat(masks).numpy(), [len(d) for d in drafts],
                                 drafts=drafts, forced=forced)

    def _count_iterations(self, scheduler_output: SchedulerOutput,
                          model_runner_output: ModelRunnerOutput) -> None:
        committed = getattr(model_runner_output, "dllm_committed", {})
        rows = getattr(model_runner_output, "dllm_rows", {})
        for request_id in model_runner_output.req_ids:
            progress = self._progress.get(request_id)
            if progress is None:
                continue
            progress.iterations += 1
            self._dllm_stats.observe_iteration(
                committed.get(request_id, 0),
                rows.get(request_id, scheduler_output.num_scheduled_tokens[request_id]))

    def make_stats(self, *args, **kwargs) -> SchedulerStats | None:
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            dllm, self._dllm_stats = self._dllm_stats, DllmStats()
            dllm.block.update(self._progress[r.request_id].block for r in self.running)
            # See engine/stats.py for why the counters travel in this field.
            stats.running_lora_adapters.update(dllm.to_wire())
        return stats

    def _cached_prefix(self, request: Request, grid: BlockGrid
                       ) -> tuple[KVCacheBlocks | None, int]:
        """The pages vLLM's prefix cache holds of a new block-causal request's prompt, and
        how many positions they cover (None, 0 where the cache does not apply).

        Only whole prompt blocks are ever cached (see `schedule`). A position's K/V depend
        on every token up to the end of its block, while a page's hash covers the tokens
        up to the page's end: a hit counts up to the last boundary that is both a page
        and a block boundary, where the two agree.
        """
        if not (grid.block_causal and self.cache_config.enable_prefix_caching) \
                or request.status == RequestStatus.PREEMPTED:
            return None, 0
        blocks, hit, _ = self.kv_cache_manager.get_computed_blocks(request)
        unit = math.lcm(grid.block_length, self.block_size)
        cached = hit // unit * unit
        pages = cached // self.block_size
        return KVCacheBlocks(tuple(group[:pages] for group in blocks.blocks)), cached

    def _lower_priority_victim(self, request: Request) -> Request | None:
        """The running request to preempt so that `request` fits, if policy allows."""
        if self.policy != SchedulingPolicy.PRIORITY:
            return None
        candidates = [r for r in self.running
                      if (r.priority, r.arrival_time) > (request.priority, request.arrival_time)]
        return max(candidates, key=lambda r: (r.priority, r.arrival_time), default=None)


def _bit(j: int) -> int:
    """Bit j of an int32 bitmask word, as the signed value that holds it."""
    return (1 << j) - (1 << 32 if j == 31 else 0)


def _single_token(row: torch.Tensor) -> int | None:
    """The token an int32 bitmask row allows, if it allows exactly one."""
    words = torch.nonzero(row).flatten().tolist()
    if len(words) != 1:
        return None
    value = int(row[words[0]]) & 0xFFFFFFFF
    if value & (value - 1):
        return None
    return 32 * words[0] + value.bit_length() - 1
