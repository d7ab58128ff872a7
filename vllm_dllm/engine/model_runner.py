"""Runs one denoising iteration per engine step on vLLM's model runner.

Loading, KV cache allocation and binding come from the platform's V1 runner;
`execute_model` is replaced. Each request gets, when it joins, a host record
(`RequestState`: parameters parsed once, the mirror the host lays iterations out
from) and a persistent row of `DenoiseBatch` on the device (its tokens, schedule
position, parameters as tensors, R² streaks) plus a row of the runner's block
table. An iteration then is: lay out every request's recomputed positions with
batched tensor operations, one forward pass (one attention call per layer over
vLLM's pages), logits for the masked positions of each request's current block,
one batched decoding step, and one copy of its packed result to the host, from
which each record takes the tokens that became final.
"""

import functools
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from vllm.forward_context import set_forward_context
from vllm.platforms import current_platform
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, LogprobsLists, ModelRunnerOutput

from vllm_dllm.engine.pass_rows import PassRows, SlotCaches
from vllm_dllm.engine.query_batch import QueryBatch, segment_query_batch
from vllm_dllm.engine.scheduler import DllmGrammarOutput
from vllm_dllm.model_executor.registry import BY_ARCHITECTURE
from vllm_dllm.params import DllmParams
from vllm_dllm.sampling import logprobs
from vllm_dllm.sampling.batch import BatchPlan, DenoiseBatch, SpecialTokens, full_blocks
from vllm_dllm.sampling.grammar import GrammarPlan
from vllm_dllm.sampling.state import RequestState
from vllm_dllm.sampling.token_filters import TokenFilters

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner as PlatformModelRunner
else:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as PlatformModelRunner

# The block of the decoding core's warm-up (LLaDA's default `block_length`).
WARM_UP_BLOCK = 32


@dataclass
class DllmRunnerOutput(ModelRunnerOutput):
    # Rows each request's first layer computed in this iteration, and will compute in
    # its next one (the scheduler's budget); both are `RequestState.segments`.
    dllm_rows: dict[str, int] = field(default_factory=dict)
    dllm_next_rows: dict[str, int] = field(default_factory=dict)
    # For the scheduler's stats: tokens each request committed this iteration, and the
    # block it decodes next.
    dllm_committed: dict[str, int] = field(default_factory=dict)
    dllm_block: dict[str, int] = field(default_factory=dict)
    # Per structured request, the predictions at its masked positions from its frontier
    # on, as far as it has them: what the scheduler builds the next grammar masks on.
    dllm_drafts: dict[str, list[int]] = field(default_factory=dict)


class DllmModelRunner(PlatformModelRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        hf_config = self.model_config.hf_config
        self.mask_token_id = hf_config.mask_token_id
        self.requests: dict[str, RequestState] = {}
        max_rows = self.scheduler_config.max_num_seqs
        max_len = self.model_config.max_model_len
        self.batch = DenoiseBatch(max_rows, max_len, SpecialTokens(
            mask=hf_config.mask_token_id, eos=hf_config.eos_token_id,
            eot=getattr(hf_config, "eot_token_id", None)), self.device,
            block_causal=BY_ARCHITECTURE[self.model_config.architecture].block_causal)
        self.block_size = self.cache_config.block_size
        self.block_table = torch.zeros((max_rows, -(-max_len // self.block_size)),
                                       dtype=torch.int32, device=self.device)
        self.n_layers = hf_config.num_hidden_layers
        self.slot_caches: SlotCaches | None = None
        # Rows computed per layer (queries, exact attention, FFN), summed over every
        # pass (benchmarks read them).
        self.layer_rows = [0] * self.n_layers
        self.layer_attention_rows = [0] * self.n_layers
        self.layer_ffn_rows = [0] * self.n_layers
        # An iteration between its forward (`execute_model`) and its decoding step
        # (`sample_tokens`, which gets the grammar masks the scheduler built meanwhile).
        self._pending: tuple | None = None

    def _dummy_sampler_run(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """vLLM's sampler warm-up, which its GPU worker runs inside the profile run that
        sizes the KV cache (and once more after start-up); vLLM's sampler never runs
        here, so the decoding core takes its place at its largest: logits for as many
        rows as one iteration can score (each is a row of a window the scheduler
        charges against `max_num_batched_tokens`), rounded up to whole blocks, and one
        `step` on them at temperature > 0 (its float32 copy, float64 chunks and
        sampling). `--gpu-memory-utilization` then leaves room for both."""
        budget = self.scheduler_config.max_num_batched_tokens
        rows = -(-budget // WARM_UP_BLOCK) * WARM_UP_BLOCK
        hidden = torch.rand(rows, hidden_states.shape[-1], dtype=hidden_states.dtype,
                            device=hidden_states.device)
        logits = self.model.compute_logits(hidden)
        batch, plan = full_blocks(rows // WARM_UP_BLOCK, WARM_UP_BLOCK, 0.7, self.batch.special,
                                  self.device, self.batch.block_causal)
        batch.step(plan, logits)
        return logits

    def _set_pages(self, row: int, block_ids: list[int]) -> None:
        if row >= self.block_table.shape[0]:
            grown = torch.zeros((len(self.batch.params), self.block_table.shape[1]),
                                dtype=torch.int32, device=self.device)
            grown[: self.block_table.shape[0]] = self.block_table
            self.block_table = grown
        self.block_table[row, : len(block_ids)] = torch.tensor(block_ids, dtype=torch.int32)

    def _update_requests(self, scheduler_output: SchedulerOutput) -> None:
        for req_id in scheduler_output.finished_req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None:
                self.batch.remove(state.row)
        for new in scheduler_output.scheduled_new_reqs:
            sp = new.sampling_params
            params = DllmParams.from_wire(sp.extra_args)
            num_logprobs = sp.num_logprobs
            if num_logprobs == -1:
                num_logprobs = self.model_config.get_vocab_size()
            row = self.batch.add(new.prompt_token_ids, params, sp.temperature, sp.seed,
                                 sp.top_p, sp.top_k, _token_filters(sp), num_logprobs)
            self.requests[new.req_id] = RequestState(
                len(new.prompt_token_ids), params, self.mask_token_id, row,
                self.model.dllm_logits_offset, self.batch.block_causal,
                new.num_computed_tokens, keeps_logprobs=num_logprobs is not None)
            self._set_pages(row, new.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, block_ids in zip(cached.req_ids, cached.new_block_ids):
            if block_ids is not None:
                # A resumed request gets fresh pages; its canvas survived preemption.
                state = self.requests[req_id]
                self._set_pages(state.row, block_ids[0])
                state.needs_refresh = True
                state.cached = 0

    def _slot_caches(self) -> SlotCaches:
        if self.slot_caches is None:
            num_slots = self.kv_cache_config.num_blocks * self.block_size
            self.slot_caches = SlotCaches(num_slots, self.device, self.model_config.dtype)
        return self.slot_caches

    def _controller(self, states: list[RequestState], query: QueryBatch, rows: torch.Tensor,
                    block_starts: torch.Tensor, metadata: dict) -> PassRows:
        """The pass's row controller, with what skipping rules read from the decoding
        state when some request skips tokens."""
        counts, positions, request = query.counts, query.positions, query.request
        skips = [s.skip_plan(self.n_layers, c) for s, c in zip(states, counts)]
        features: dict[str, torch.Tensor] = {}
        caches = None
        if any(s.method != "none" for s in skips):
            batch_rows = rows[request]
            leftmost = self.batch.leftmost_mask(rows, block_starts)
            # A row is scored by the position it predicts; its K/V are its own position's.
            predicted = (positions + self.model.dllm_logits_offset).clamp(max=self.batch.max_len)
            features = dict(last_conf=self.batch.last_conf[batch_rows, predicted],
                            fresh=self.batch.fresh[batch_rows, positions],
                            leftmost=predicted == leftmost[request])
            caches = self._slot_caches()
        context_width = (self.model_config.get_num_attention_heads(self.parallel_config)
                         * self.model_config.get_head_size())
        return PassRows(metadata, self.attention_layers, counts, query.seq_lens, positions,
                        request, skips, caches, features, self.model_config.get_hidden_size(),
                        context_width)

    @functools.cached_property
    def attention_layers(self) -> list[str]:
        """The attention layers' names in layer order (what a row controller installs
        each layer's metadata under)."""
        names = self.kv_cache_config.kv_cache_groups[0].layer_names
        return sorted(names, key=extract_layer_index)

    def _count_rows(self, controller: PassRows) -> None:
        for total, rows in ((self.layer_rows, controller.rows_per_layer),
                            (self.layer_attention_rows, controller.attention_rows_per_layer),
                            (self.layer_ffn_rows, controller.ffn_rows_per_layer)):
            for i, n in enumerate(rows):
                total[i] += n

    def run_pass(self, states: list[RequestState], query: QueryBatch, rows: torch.Tensor
                 ) -> tuple[BatchPlan, torch.Tensor]:
        """One pass over `query`: the plan of the iteration and the logits of the masked
        block positions that reached the last layer (placeholders for those token
        skipping left out)."""
        metadata = dict.fromkeys(self.attention_layers, query.metadata)
        block_starts = torch.tensor([s.prompt_len + s.block_start for s in states],
                                    device=self.device)
        controller = self._controller(states, query, rows, block_starts, metadata)
        with set_forward_context(metadata, self.vllm_config, num_tokens=len(query.input_ids)):
            hidden = self.model(input_ids=query.input_ids, positions=query.positions,
                                rows=controller)
        self._count_rows(controller)
        offset = self.model.dllm_logits_offset
        predicted = controller.positions + offset
        is_mask = self.batch.tokens[rows[controller.request],
                                    predicted.clamp(max=self.batch.max_len)] == self.mask_token_id
        out_rows, columns, valid, logit_request = controller.logit_rows(
            block_starts,
            torch.tensor([s.params.block_length for s in states], device=self.device),
            is_mask & (predicted < self.batch.max_len),
            [len(s.masked_columns()) for s in states], offset)
        plan = self.batch.plan([s.row for s in states], logit_request, columns, valid)
        return plan, self.model.compute_logits(hidden[out_rows])

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput, intermediate_tensors=None
                      ) -> ModelRunnerOutput | None:
        """The iteration's forward; its decoding step waits for `sample_tokens`, as in
        vLLM's runner, so that structured requests get the grammar's masks."""
        self._update_requests(scheduler_output)
        req_ids = list(scheduler_output.num_scheduled_tokens)
        if not req_ids:
            return EMPTY_MODEL_RUNNER_OUTPUT
        states = [self.requests[r] for r in req_ids]
        rows = self.batch.rows_tensor([s.row for s in states])
        query = segment_query_batch(
            self.batch.tokens, rows, [s.segments() for s in states],
            torch.tensor([s.sequence_length for s in states]), self.block_table[rows],
            self.block_size)
        plan, logits = self.run_pass(states, query, rows)
        self._pending = (req_ids, states, query.counts, plan, logits)
        return None

    @torch.inference_mode()
    def sample_tokens(self, grammar_output: DllmGrammarOutput | None) -> ModelRunnerOutput:
        """The decoding step of the iteration `execute_model` ran the forward of."""
        if self._pending is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        (req_ids, states, counts, plan, logits), self._pending = self._pending, None
        if grammar_output is not None:
            plan = replace(plan, grammar=self._grammar_plan(req_ids, states, grammar_output,
                                                            plan.width))
        # The iteration's one device-to-host transfer.
        packed = self.batch.step(plan, logits).tolist()
        width = plan.width
        drafts: dict[str, list[int]] = {}
        records: list[list[int]] = []
        sampled = []
        for req_id, state, row in zip(req_ids, states, packed):
            extra = row[width + 1:]
            if plan.grammar is not None:
                predicted, extra = extra[:width], extra[width:]
            block = state.block
            sampled.append(state.apply(row[: width + 1], extra if plan.logprobs is not None
                                       else None))
            records.append(state.take_logprobs(len(sampled[-1])))
            if plan.grammar is not None and req_id in grammar_output.structured_output_request_ids:
                drafts[req_id] = _drafts(state, predicted, block)
        return DllmRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=_logprobs_lists(records, sampled),
            dllm_rows=dict(zip(req_ids, counts)),
            dllm_next_rows={r: s.rows() for r, s in zip(req_ids, states)},
            dllm_committed={r: s.last_commits for r, s in zip(req_ids, states)},
            dllm_block={r: s.block for r, s in zip(req_ids, states)},
            dllm_drafts=drafts,
        )

    def _grammar_plan(self, req_ids: list[str], states: list[RequestState],
                      grammar_output: DllmGrammarOutput, width: int) -> GrammarPlan:
        """The scheduler's masks laid out per batch request: a structured request's rows
        start at its frontier (its first masked position; its committed text ends there),
        and so do its drafts and single-token flags."""
        order = {r: i for i, r in enumerate(grammar_output.structured_output_request_ids)}
        num_rows = [len(f) for f in grammar_output.forced]
        starts = np.cumsum([0] + num_rows[:-1]).tolist()
        first_row, num, frontier = [], [], []
        drafts = torch.full((len(states), width), -1, dtype=torch.long)
        forced = torch.zeros((len(states), width), dtype=torch.bool)
        for b, (req_id, state) in enumerate(zip(req_ids, states)):
            f = state.emitted - state.block_start
            # A block its grammar's commits finished before its fixed steps did has no
            # mask left: its remaining iterations commit nothing.
            i = order.get(req_id) if f < state.params.block_length else None
            first_row.append(0 if i is None else starts[i])
            num.append(0 if i is None else num_rows[i])
            frontier.append(f)
            if i is not None:
                d, single = grammar_output.drafts[i], grammar_output.forced[i]
                drafts[b, f : f + len(d)] = torch.tensor(d, dtype=torch.long)
                forced[b, f : f + len(single)] = torch.tensor(single)

        def device(t) -> torch.Tensor:
            return torch.as_tensor(t).to(self.device, non_blocking=True)

        return GrammarPlan(device(grammar_output.grammar_bitmask), device(first_row),
                           device(num), device(frontier), device(drafts), device(forced))


def _token_filters(sp: SamplingParams) -> TokenFilters:
    """vLLM's filters of a request as the decoding core takes them: bad words as the
    front end tokenized them, `min_tokens` against every token the request stops at."""
    return TokenFilters(logit_bias=sp.logit_bias or {},
                        allowed_token_ids=sp.allowed_token_ids or [],
                        bad_words=sp.bad_words_token_ids or [], min_tokens=sp.min_tokens,
                        end_ids=sorted(sp.all_stop_token_ids))



def _drafts(state: RequestState, predicted: list[int], block: int) -> list[int]:
    """A structured request's predictions from its frontier to the end of its block
    (none once the block is done: the next one has no predictions yet)."""
    if state.block != block:
        return []
    out = []
    for token in predicted[state.emitted - state.block_start : state.params.block_length]:
        if token < 0:
            break
        out.append(token)
    return out


def _logprobs_lists(records: list[list[list[int]]], sampled: list[list[int]]
                    ) -> LogprobsLists | None:
    """vLLM's sample logprobs of an iteration's returned tokens: the rows of request i
    start at `cu_num_generated_tokens[i]` (none for requests that did not ask)."""
    flat = [r for rows in records for r in rows]
    if not flat:
        return None
    tokens = [t for rows, out in zip(records, sampled) if rows for t in out]
    k = max((len(r) - 2) // 2 for r in flat)
    ids, values, ranks = logprobs.unpack(flat, tokens, k)
    starts = np.cumsum([0] + [len(r) for r in records]).tolist()
    return LogprobsLists(ids, values, ranks, starts)
