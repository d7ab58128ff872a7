"""The decoding state of every running request, in persistent rows on the model's device.

A request gets a row when it joins (`add`) and gives it back when it leaves
(`remove`); its parameters are written into the row once, and everything that
changes per iteration (its tokens, block, step, iteration counter, R² streaks)
stays in the row. An iteration (`step`) reads the rows of the scheduled requests
as they are, turns their logits into commits with batched tensor operations
(no per-request loop, no host synchronisation), writes the commits back into the
rows and returns one packed tensor that the caller copies to the host once.

Layout of `tokens`: row r holds the request's prompt followed by its canvas; the
last column is scratch, where padding columns of a narrower block (and the prompt
columns of a block-diffusion model's first block) read and write.

A batch serves one model: `block_causal` says whether it is a block-diffusion one
(SDAR, LLaDA2), whose decoding differs in three ways, after their `generate`
functions: blocks lie on the grid from position 0 (`blocks.BlockGrid`), a sampled
token's confidence is its probability under the distribution it was drawn from
(temperature applied), and the `threshold` policy commits at least the fixed
schedule's count (`steps` per block), not just one token.
"""

from dataclasses import dataclass, fields, replace

import torch

from vllm_dllm.params import DEFAULTS, REMASKING, ROW_DTYPES, DllmParams, row_values
from vllm_dllm.sampling import dream, logprobs, noise, truncation
from vllm_dllm.sampling.blocks import BlockGrid, block_grid
from vllm_dllm.sampling.eos import eos_eot_confidence, suppress_eos_logits
from vllm_dllm.sampling.grammar import GrammarPlan
from vllm_dllm.sampling.policies import POLICIES, PolicyBatch, select
from vllm_dllm.sampling.r2 import R2Batch, StreakState, apply_r2
from vllm_dllm.sampling.schedule import transfer_counts
from vllm_dllm.sampling.token_filters import (NOT_COMMITTED, TokenFilterBatch, TokenFilterPlan,
                                              TokenFilters, word_context)

_STREAK_FIELDS = ("ids", "count", "conf_sum", "conf_max")
# Rules a batch runs only when one of its requests sets them off their default.
_OPTIONAL_RULES = ("remasking", "logits_eos_inf", "confidence_eos_eot_inf",
                   "delay_eos_generation")


@dataclass(frozen=True)
class SpecialTokens:
    mask: int
    eos: int
    eot: int | None


@dataclass(frozen=True)
class BatchPlan:
    """What one iteration decodes, laid out by the caller from its host-side mirror.

    `rows` [B] are the batch rows of the scheduled requests; logits row i belongs
    to request `logit_request[i]` (0..B-1) at block column `logit_column[i]`; the
    logits cover exactly the masked columns of each request's current block.
    `sampled` lists the logits rows decoded at temperature > 0; `hot` and `filter`
    (host, per logits row, None: none) mark them and those whose sampler (Dream's, a
    block-diffusion model's) truncates by top_p / top_k. `logit_valid`
    (None: all) marks the logits rows that hold a prediction: a pass that skipped
    a masked position gives it a placeholder row, which is never committed. The
    host-side fields say which policies and optional rules (`options`, parameter
    names) any of these requests uses; `dream`
    that these requests decode with Dream's samplers (`algs`: which), `ratios`
    [B, steps] then their schedules (padded with 1). `token_filters`: the iteration's
    `logit_bias` / `allowed_token_ids` / `bad_words` / `min_tokens` (None: none).
    `logprobs`: how many top logprobs the records of `logprob_rows` (the logits rows
    of requests that asked for logprobs) carry, None when none did. `grammar`: the
    structured requests' token masks (None: none).
    """

    rows: torch.Tensor
    logit_request: torch.Tensor
    logit_column: torch.Tensor
    sampled: torch.Tensor | None
    width: int
    policies: frozenset[str]
    options: frozenset[str]
    tracks_positions: bool
    r2: R2Batch | None
    logit_valid: torch.Tensor | None = None
    dream: bool = False
    algs: frozenset[int] = frozenset()
    ratios: torch.Tensor | None = None
    hot: torch.Tensor | None = None
    filter: torch.Tensor | None = None
    token_filters: TokenFilterPlan | None = None
    logprobs: int | None = None
    logprob_rows: torch.Tensor | None = None
    grammar: GrammarPlan | None = None


class DenoiseBatch:
    def __init__(self, max_rows: int, max_len: int, special: SpecialTokens,
                 device: torch.device | str = "cpu", block_causal: bool = False):
        self.special = special
        self.block_causal = block_causal
        self.device = torch.device(device)
        self.max_len = max_len
        self.width = 1
        # Host copies of the parameters, to lay out iterations without reading the device.
        self.params: list[DllmParams | None] = [None] * max_rows
        self.temperatures: list[float] = [0.0] * max_rows
        self.filters: list[bool] = [False] * max_rows
        self.token_filters: list[TokenFilters | None] = [None] * max_rows
        # Top logprobs each request asked for (None: no logprobs).
        self.num_logprobs: list[int | None] = [None] * max_rows
        self._free = list(range(max_rows - 1, -1, -1))

        def zeros(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(max_rows, dtype=dtype, device=self.device)

        self.tokens = torch.full((max_rows, max_len + 1), special.mask, dtype=torch.long,
                                 device=self.device)
        # Per position, what token skipping scores rows by: the probability of its
        # top prediction when it last had logits (0 once committed), and whether
        # the last iteration committed it.
        self.last_conf = torch.zeros((max_rows, max_len + 1), dtype=torch.float32,
                                     device=self.device)
        self.fresh = torch.zeros((max_rows, max_len + 1), dtype=torch.bool, device=self.device)
        # The decoding parameters the table marks as per-row tensors (`params.ROW_DTYPES`:
        # `policy`, `threshold`, `alg`, ...; a choice is its index), then what comes from
        # vLLM's sampling parameters (top_p 1 and top_k 0: off) and the schedule.
        for name, dtype in ROW_DTYPES.items():
            setattr(self, name, zeros(dtype))
        self.prompt_len = zeros(torch.long)
        # Absolute start of each request's first decoded block (`BlockGrid.origin`).
        self.origin = zeros(torch.long)
        self.steps_per_block = zeros(torch.long)
        self.temperature = zeros(torch.float64)
        self.top_p = zeros(torch.float64)
        self.top_k = zeros(torch.long)
        self.seed = zeros(torch.long)
        self.block = zeros(torch.long)
        self.step_in_block = zeros(torch.long)
        self.iteration = zeros(torch.long)
        self.r2 = R2Batch.build([None] * max_rows, self.device)
        self._composition: tuple[tuple[int, ...], dict] | None = None
        self.streaks = StreakState(max_rows, self.width, self.device)

    def add(self, prompt: list[int], params: DllmParams, temperature: float, seed: int,
            top_p: float = 1.0, top_k: int = 0, token_filters: TokenFilters | None = None,
            num_logprobs: int | None = None) -> int:
        """Give a joining request a row and write its parameters; returns the row.
        `top_p` / `top_k` truncate the sampler's distribution (1 / 0 or less: off;
        admission refuses them for LLaDA, whose sampler has none);
        `num_logprobs`: the top logprobs its tokens' records carry (None: no records)."""
        if not self._free:
            self._grow()
        grid = self.grid(len(prompt), params)
        if grid.sequence_length > self.max_len:
            raise ValueError("prompt + canvas exceeds the batch's max_len")
        row = self._free.pop()
        self.params[row] = params
        self.temperatures[row] = temperature
        top_k = max(top_k, 0)
        self.filters[row] = top_p < 1 or top_k > 0
        self.token_filters[row] = (token_filters if token_filters is not None
                                   and token_filters.in_use else None)
        self.num_logprobs[row] = num_logprobs
        self._composition = None
        if params.block_length > self.width:
            self.width = params.block_length
            self.streaks.widen(self.width)
        self.tokens[row] = self.special.mask
        self.tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.last_conf[row] = 0
        self.fresh[row] = False
        for name, value in (*row_values(params).items(),
                            ("prompt_len", len(prompt)), ("origin", grid.origin),
                            ("steps_per_block", grid.steps_per_block),
                            ("temperature", temperature), ("seed", seed), ("top_p", top_p),
                            ("top_k", top_k), ("block", 0), ("step_in_block", 0),
                            ("iteration", 0)):
            getattr(self, name)[row] = value
        one = R2Batch.build([params.r2_settings], self.device)
        for f in fields(R2Batch):
            if isinstance(getattr(one, f.name), torch.Tensor):
                getattr(self.r2, f.name)[row] = getattr(one, f.name)[0]
        self.streaks.block[row] = -1
        for name in _STREAK_FIELDS:
            getattr(self.streaks, name)[row] = -1 if name == "ids" else 0
        return row

    def grid(self, prompt_len: int, params: DllmParams) -> BlockGrid:
        """Where a request's blocks lie in this batch's model."""
        return block_grid(prompt_len, params, self.block_causal)

    def _grow(self) -> None:
        """Double the rows: preempted requests keep theirs, so more than max_num_seqs
        requests can hold one."""
        old = len(self.params)

        def grown(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, torch.zeros_like(t)]) if t.dim() and t.shape[0] == old else t

        for holder in (self, self.streaks):
            for name, value in list(vars(holder).items()):
                if isinstance(value, torch.Tensor):
                    setattr(holder, name, grown(value))
        self.r2 = replace(self.r2, **{f.name: grown(getattr(self.r2, f.name))
                                      for f in fields(R2Batch)
                                      if isinstance(getattr(self.r2, f.name), torch.Tensor)})
        self.params += [None] * old
        self.temperatures += [0.0] * old
        self.filters += [False] * old
        self.token_filters += [None] * old
        self.num_logprobs += [None] * old
        self._free = list(range(2 * old - 1, old - 1, -1))

    def remove(self, row: int) -> None:
        self.params[row] = None
        self.token_filters[row] = None
        self.num_logprobs[row] = None
        self._composition = None
        self._free.append(row)

    def plan(self, rows: list[int], logit_request: torch.Tensor, logit_column: torch.Tensor,
             logit_valid: torch.Tensor | None = None, grammar: GrammarPlan | None = None
             ) -> BatchPlan:
        """The plan of an iteration over `rows`; `logit_request` is a host tensor,
        `logit_column` and `logit_valid` host or device tensors. What depends only on
        which requests run is kept until that changes."""
        self.rows_tensor(rows)
        fixed = self._composition[1]
        hot, filters, wants = (None if fixed[k] is None else fixed[k][logit_request]
                               for k in ("hot", "filter", "wants_logprobs"))
        token_filters = fixed["token_filters"]
        return BatchPlan(
            logit_request=logit_request.to(self.device, non_blocking=True),
            logit_column=logit_column.to(self.device, non_blocking=True),
            sampled=None if hot is None else _indices(hot, self.device),
            hot=hot, filter=filters,
            logit_valid=logit_valid,
            token_filters=None if token_filters is None else token_filters.layout(logit_request),
            logprob_rows=None if wants is None else _indices(wants, self.device),
            grammar=grammar,
            **{k: v for k, v in fixed.items()
               if k not in ("hot", "filter", "token_filters", "wants_logprobs")},
        )

    def rows_tensor(self, rows: list[int]) -> torch.Tensor:
        """`rows` as a device tensor, kept with the batch's composition."""
        key = tuple(rows)
        if self._composition is None or self._composition[0] != key:
            self._composition = (key, self._compose(rows))
        return self._composition[1]["rows"]

    def leftmost_mask(self, rows: torch.Tensor, block_start: torch.Tensor) -> torch.Tensor:
        """Absolute position of the first mask of each row's current block (-1 if none);
        `block_start` [B] are the blocks' absolute starts."""
        cells, valid = self.block_positions(rows, self.width)
        masked = (self.tokens[rows[:, None], cells] == self.special.mask) & valid
        first = block_start + masked.int().argmax(-1)
        return torch.where(masked.any(-1), first, torch.full_like(first, -1))

    def _compose(self, rows: list[int]) -> dict:
        params = [self.params[r] for r in rows]
        hot = torch.tensor([self.temperatures[r] > 0 for r in rows])
        filters = torch.tensor([self.filters[r] for r in rows])
        uses_alg = {p.alg is not None for p in params}
        if len(uses_alg) > 1:
            raise ValueError("one batch cannot mix Dream's samplers with LLaDA's remasking")
        dream_rows = uses_alg == {True}
        ratios = None
        if dream_rows:
            # Each request's schedule, built on the host once per composition.
            schedules = [dream.schedule_ratios(p.steps_per_block, p.eps) for p in params]
            ratios = torch.ones(len(rows), max(len(t) for t in schedules), dtype=torch.float32)
            for i, t in enumerate(schedules):
                ratios[i, : len(t)] = t
            ratios = ratios.to(self.device, non_blocking=True)
        settings = [p.r2_settings for p in params]
        rows_dev = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        token_filters = [self.token_filters[r] for r in rows]
        asked = [self.num_logprobs[r] for r in rows]
        r2 = None
        if any(settings):
            host = R2Batch.build(settings)
            r2 = replace(host, **{f.name: getattr(self.r2, f.name)[rows_dev]
                                  for f in fields(R2Batch)
                                  if isinstance(getattr(host, f.name), torch.Tensor)})
        return dict(
            rows=rows_dev,
            hot=hot if bool(hot.any()) else None,
            filter=filters if bool(filters.any()) else None,
            dream=dream_rows,
            algs=frozenset(dream.ALGS.index(p.alg) for p in params if p.alg is not None),
            ratios=ratios,
            width=max(p.block_length for p in params),
            policies=frozenset(p.policy for p in params),
            options=frozenset(name for name in _OPTIONAL_RULES
                              if any(getattr(p, name) != DEFAULTS[name] for p in params)),
            tracks_positions=any(p.skip != "none" for p in params),
            r2=r2,
            token_filters=(TokenFilterBatch([f or TokenFilters() for f in token_filters],
                                            self.device) if any(token_filters) else None),
            logprobs=max((n for n in asked if n is not None), default=None),
            wants_logprobs=(torch.tensor([n is not None for n in asked])
                            if any(n is not None for n in asked) else None),
        )

    def block_start(self, rows: torch.Tensor) -> torch.Tensor:
        """Absolute start of each row's current block."""
        return self.origin[rows] + self.block[rows] * self.block_length[rows]

    def block_positions(self, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns of `tokens` holding each row's current block ([B, width]; padding and
        prompt columns go to the scratch column) and which of them are canvas."""
        col = torch.arange(width, device=self.device)
        start = self.block_start(rows)[:, None]
        valid = (col < self.block_length[rows][:, None]) & (start + col >= self.prompt_len[rows][:, None])
        return torch.where(valid, start + col, self.max_len), valid

    def step(self, plan: BatchPlan, logits: torch.Tensor) -> torch.Tensor:
        """Decode one iteration from `logits` [M, V] laid out as `plan` says.

        Returns [B, width + 1 (+ width) (+ width * record)] long: each request's block
        after this iteration's commits, then 1 where the request moved on to its next
        block; with a grammar, the iteration's prediction at each block column (-1:
        none), the drafts it reports; with logprobs, each block column's record
        (`logprobs.records`, zeros where it had no logits row).
        """
        special, rows, b, k = self.special, plan.rows, len(plan.rows), plan.width
        req, col = plan.logit_request, plan.logit_column
        cells, valid = self.block_positions(rows, k)
        current = self.tokens[rows[:, None], cells]
        # Canvas positions (what the noise and the token filters are keyed by).
        position = (self.block_start(rows) - self.prompt_len[rows])[req] + col
        if plan.logit_valid is not None:
            # Placeholder rows land in a scratch column that is dropped below.
            col = torch.where(plan.logit_valid, col, k)

        # A committed mask would stay masked: the mask id is never a prediction.
        logits = logits.float()
        logits[:, special.mask] = float("-inf")
        if "logits_eos_inf" in plan.options:
            suppress_eos_logits(logits, special.eos, self.logits_eos_inf[rows][req])
        filters = plan.token_filters
        words = filters is not None and filters.batch.has_words
        if filters is not None:
            span = filters.batch.span
            context = self._word_context(rows, current, valid, span) if words else None
            filters.apply(logits, req, plan.logit_column, position, context)
        if plan.grammar is not None:
            plan.grammar.apply(logits, req, plan.logit_column)
        top_ids = logits.argmax(-1)
        log_norm = noise.log_normalizer(logits)

        def probability(ids: torch.Tensor) -> torch.Tensor:
            return (logits.gather(-1, ids[:, None]).squeeze(-1).double() - log_norm).exp()

        top_conf = probability(top_ids)
        seed = self.seed[rows][req]
        iteration = self.iteration[rows][req]
        x0, confidence = top_ids, top_conf
        if plan.dream:
            x0, confidence = self._dream_tokens(plan, logits, seed, iteration, position)
        elif plan.sampled is not None:
            s = plan.sampled
            u = noise.uniforms(seed[s], iteration[s], position[s], noise.STREAM_SAMPLE)
            temperature = self.temperature[rows][req][s]
            if self.block_causal:
                x0, confidence = self._block_tokens(plan, logits, temperature, u, top_ids,
                                                    top_conf)
            else:
                x0 = top_ids.index_copy(0, s, noise.sample(logits[s], temperature, u))
                confidence = probability(x0)
        if "confidence_eos_eot_inf" in plan.options and special.eot is not None:
            use = self.confidence_eos_eot_inf[rows][req]
            confidence = torch.where(use, eos_eot_confidence(logits, x0, special.eos, special.eot),
                                     confidence)
        if "remasking" in plan.options:
            scores = noise.uniforms(seed, iteration, position, noise.STREAM_REMASK)
            random = self.remasking[rows][req] == REMASKING.index("random")
            confidence = torch.where(random, scores, confidence)
        # What token skipping scores a position by next time (ES-dLLM's `all_confidence`).
        tracked = top_conf
        if "delay_eos_generation" in plan.options:
            # After the remasking score, as ES-dLLM zeroes its `x0_p` (random or not).
            delayed = self._eos_delayed(rows, req, position, x0)
            confidence = torch.where(delayed, torch.zeros_like(confidence), confidence)
            if not plan.dream:
                # ES-dLLM stores LLaDA's confidence after its EOS delay, Dream's before it
                # (zhuzj19/ES-dLLM generate.py, sample_tokens_LLaDA / sample_tokens_Dream).
                tracked = torch.where(delayed, torch.zeros_like(tracked), tracked)

        def scatter(values: torch.Tensor, fill) -> torch.Tensor:
            out = torch.full((b, k + 1), fill, dtype=values.dtype, device=values.device)
            return out.index_put_((req, col), values)[:, :k]

        conf_matrix = scatter(confidence, float("-inf"))
        tokens = scatter(x0, 0)
        extras = []
        if plan.grammar is not None:
            predicted = scatter(x0, -1)
            extras.append(predicted)
        if plan.logprobs is not None:
            s = plan.logprob_rows
            records = logprobs.records(logits[s], x0[s], self.temperature[rows][req][s],
                                       plan.logprobs)
            at = torch.full((b, k + 1, records.shape[1]), 0, dtype=torch.long,
                            device=records.device).index_put_((req[s], col[s]), records)
            extras.append(at[:, :k].flatten(1))
        length = self.block_length[rows]
        step = self.step_in_block[rows]
        counts = transfer_counts(length, self.steps_per_block[rows], step)
        # A block that token skipping left unfinished after its steps goes on, one
        # token (at least) an iteration.
        counts = torch.where(step >= self.steps_per_block[rows], counts.clamp(min=1), counts)
        # LLaDA2's and SDAR's threshold rule (`low_confidence_dynamic`) keeps the schedule's
        # count as a floor; Fast-dLLM's commits the top one at least.
        floor = counts.clamp(min=1) if self.block_causal else None
        commit = select(conf_matrix, PolicyBatch(
            policy=self.policy[rows], counts=counts, floor=floor, threshold=self.threshold[rows],
            factor=self.factor[rows], frechet_delta=self.frechet_delta[rows],
            used=plan.policies))
        if plan.dream:
            commit = self._dream_fixed(plan, conf_matrix, step, commit)
        if plan.r2 is not None:
            commit, tokens = self._apply_r2(plan, commit, tokens, conf_matrix,
                                            scatter(top_ids, 0), scatter(top_conf, 0.0))
        held = torch.zeros_like(commit)
        if words:
            new = commit & valid
            proposed = self._word_context(rows, torch.where(new, tokens, current), valid, span)
            held = filters.break_bad_words(proposed, new)
            commit = commit & ~held
        if plan.grammar is not None:
            commit = plan.grammar.chain(commit, torch.where(predicted >= 0, tokens, -1),
                                        valid, held)

        after = torch.where(commit & valid, tokens, current)
        self.tokens[rows[:, None], cells] = after
        if plan.tracks_positions:
            self._track_positions(rows, cells, scatter(tracked.float(), -1.0), after != current)
        clean = ~((after == special.mask) & valid).any(-1)
        step = step + 1
        # LLaDA's fixed schedule runs all of a block's steps; block-diffusion models move on
        # once a block has no mask left.
        fixed = (self.policy[rows] == POLICIES.index("fixed")) & (not self.block_causal)
        if plan.grammar is not None:
            # So does a structured request's block when its grammar's commits fill it: the
            # fixed schedule no longer decides how many it commits.
            fixed = fixed & ~plan.grammar.structured
        min_steps = torch.where(fixed, self.steps_per_block[rows], torch.ones_like(step))
        advance = clean & (step >= min_steps)
        self.block[rows] = self.block[rows] + advance.long()
        self.step_in_block[rows] = torch.where(advance, torch.zeros_like(step), step)
        self.iteration[rows] = self.iteration[rows] + 1
        return torch.cat([after, advance.long()[:, None], *extras], dim=1)

    def _canvas_columns(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """Canvas positions of each row's current block columns, [B, width]."""
        start = self.block_start(rows) - self.prompt_len[rows]
        return start[:, None] + torch.arange(width, device=self.device)

    def _dream_tokens(self, plan: BatchPlan, logits: torch.Tensor, seed: torch.Tensor,
                      iteration: torch.Tensor, position: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dream's (x0, confidence), in chunks of logits rows: its float64 softmax over
        the vocabulary is as large as the logits twice over."""
        rows, req = plan.rows, plan.logit_request
        u = noise.uniforms(seed, iteration, position, noise.STREAM_SAMPLE)
        per_row = [t[rows][req] for t in (self.alg, self.temperature, self.top_p, self.top_k)]
        x0 = torch.empty(len(logits), dtype=torch.long, device=self.device)
        confidence = torch.empty(len(logits), dtype=torch.float64, device=self.device)
        chunk = max(1, noise.SAMPLE_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
        for lo in range(0, len(logits), chunk):
            hi = min(lo + chunk, len(logits))
            x0[lo:hi], confidence[lo:hi] = dream.sample_tokens(
                logits[lo:hi], *(t[lo:hi] for t in per_row), u[lo:hi],
                *(None if f is None else _indices(f[lo:hi], self.device)
                  for f in (plan.hot, plan.filter)), used=plan.algs)
        return x0, confidence

    def _block_tokens(self, plan: BatchPlan, logits: torch.Tensor, temperature: torch.Tensor,
                      u: torch.Tensor, top_ids: torch.Tensor, top_conf: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """SDAR's and LLaDA2's sampler for the sampled rows: drawn from the tempered logits
        after top-k / top-p (`truncation`), and scored by that distribution."""
        s = plan.sampled
        tempered = logits[s].double() / temperature[:, None]
        if plan.filter is not None:
            f = _indices(plan.filter[plan.hot], self.device)
            req = plan.logit_request[s][f]
            rows = plan.rows[req]
            tempered = tempered.index_copy(0, f, truncation.top_k_top_p(
                tempered[f], self.top_k[rows], self.top_p[rows]))
        drawn = noise.sample(tempered, torch.ones_like(temperature), u)
        score = tempered.gather(-1, drawn[:, None]).squeeze(-1) - torch.logsumexp(tempered, -1)
        return top_ids.index_copy(0, s, drawn), top_conf.index_copy(0, s, score.exp())

    def _dream_fixed(self, plan: BatchPlan, conf_matrix: torch.Tensor, step: torch.Tensor,
                     commit: torch.Tensor) -> torch.Tensor:
        """The `fixed` policy of Dream's samplers: the step's share of the schedule
        (counted by confidence or Gumbel keys, or `origin`'s random reveal); the other
        policies commit by the samplers' confidence as they do for LLaDA."""
        rows, k = plan.rows, plan.width
        last = self.steps_per_block[rows] - 1
        # Past its steps (token skipping left masks) a block reveals all it can.
        ratio = plan.ratios.gather(1, torch.minimum(step, last)[:, None]).squeeze(1)
        position = self._canvas_columns(rows, k)
        u = noise.uniforms(self.seed[rows][:, None], self.iteration[rows][:, None], position,
                           noise.STREAM_REMASK)
        scheduled = dream.select(conf_matrix, self.alg[rows], self.alg_temp[rows], ratio, u)
        fixed = self.policy[rows] == POLICIES.index("fixed")
        return torch.where(fixed[:, None], scheduled, commit)

    def _word_context(self, rows: torch.Tensor, block: torch.Tensor, valid: torch.Tensor,
                      span: int) -> torch.Tensor:
        """`token_filters.word_context` of each row's block tokens `block` [B, k]: the
        `span` canvas positions before the block are committed, prompt positions are not
        part of the canvas."""
        prompt_len = self.prompt_len[rows][:, None]
        before = self.block_start(rows)[:, None] - span + torch.arange(span, device=self.device)
        held = self.tokens[rows[:, None], before.clamp(min=0)]
        held = torch.where(before >= prompt_len, held, NOT_COMMITTED)
        committed = valid & (block != self.special.mask)
        return word_context(held, torch.where(committed, block, NOT_COMMITTED), span)

    def _eos_delayed(self, rows: torch.Tensor, req: torch.Tensor, position: torch.Tensor,
                     x0: torch.Tensor) -> torch.Tensor:
        """ES-dLLM's `delay_eos_generation`: the logits rows whose EOS prediction gets
        confidence 0, because the canvas has no EOS yet and the position before it is
        still a mask."""
        eos, mask = self.special.eos, self.special.mask
        prompt_len = self.prompt_len[rows]
        column = torch.arange(self.tokens.shape[1], device=self.device)
        in_canvas = (column >= prompt_len[:, None]) & (column < self.max_len)
        has_eos = ((self.tokens[rows] == eos) & in_canvas).any(-1)
        before = self.tokens[rows[req], (prompt_len[req] + position - 1).clamp(max=self.max_len)]
        return (self.delay_eos_generation[rows][req] & (x0 == eos) & ~has_eos[req]
                & (before == mask))

    def _track_positions(self, rows: torch.Tensor, cells: torch.Tensor, top_conf: torch.Tensor,
                         committed: torch.Tensor) -> None:
        """Update what token skipping reads: `top_conf` [B, width] is -1 where a block
        position had no logits this iteration (it keeps its last value)."""
        last = self.last_conf[rows[:, None], cells]
        last = torch.where(top_conf >= 0, top_conf, last)
        self.last_conf[rows[:, None], cells] = torch.where(committed, torch.zeros_like(last), last)
        self.fresh[rows] = False
        self.fresh[rows[:, None], cells] = committed

    def _apply_r2(self, plan: BatchPlan, commit: torch.Tensor, tokens: torch.Tensor,
                  conf_matrix: torch.Tensor, top_ids: torch.Tensor, top_conf: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, k = plan.rows, plan.width
        streaks = StreakState(0, k, self.device)
        for name in _STREAK_FIELDS:
            setattr(streaks, name, getattr(self.streaks, name)[rows, :k])
        streaks.block = self.streaks.block[rows]
        uniforms = None
        if "random" in plan.r2.token_modes:
            position = self._canvas_columns(rows, k)
            uniforms = noise.uniforms(self.seed[rows][:, None], self.iteration[rows][:, None],
                                      position, noise.STREAM_TOKEN_CLUSTER)
        out = apply_r2(plan.r2, streaks, commit, tokens, conf_matrix, top_ids, top_conf,
                       self.block_length[rows], self.block[rows], uniforms)
        for name in _STREAK_FIELDS:
            getattr(self.streaks, name)[rows, :k] = getattr(streaks, name)
        self.streaks.block[rows] = streaks.block
        return out


def _indices(flags: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The set positions of a host bool tensor, on `device`."""
    return torch.nonzero(flags).flatten().to(device, non_blocking=True)


def full_blocks(requests: int, block: int, temperature: float, special: SpecialTokens,
                device: torch.device | str, block_causal: bool = False
                ) -> tuple[DenoiseBatch, BatchPlan]:
    """A batch of `requests` fresh requests (threshold policy, seeded), each scoring one
    all-masked block of `block` positions, and the plan of its first iteration, whose
    `step` takes logits [requests * block, V]: the decoding core's work and memory at
    that many logits rows, without a model. The model runner's warm-up sizes vLLM's
    memory profile with it; benchmarks time it."""
    # A prompt of one whole block: a block-causal model's canvas then starts on the grid.
    batch = DenoiseBatch(requests, 2 * block, special, device, block_causal)
    params = DllmParams(block, block, block, policy="threshold")
    prompt = [1 if special.mask == 0 else 0] * block
    rows = [batch.add(prompt, params, temperature, seed) for seed in range(requests)]
    plan = batch.plan(rows, torch.arange(requests).repeat_interleave(block),
                      torch.arange(block).repeat(requests))
    return batch, plan
