"""The host-side record of one running request.

Parameters are parsed once, when the request joins; the decoding state itself
lives in the request's row of `DenoiseBatch`. This record mirrors what the host
needs to lay out the next iteration (block, step, which block columns are still
masks) and what it hands back to vLLM (the committed prefix of the canvas). It is
updated from the one packed transfer each iteration returns.
"""

from vllm_dllm.params import DllmParams
from vllm_dllm.sampling.blocks import block_grid
from vllm_dllm.sampling.recompute import cache_window, refreshes
from vllm_dllm.skipping import es
from vllm_dllm.skipping.plan import RequestSkip


class RequestState:
    def __init__(self, prompt_len: int, params: DllmParams, mask_id: int, row: int,
                 logits_offset: int = 0, block_causal: bool = False, cached: int = 0,
                 keeps_logprobs: bool = False):
        self.prompt_len = prompt_len
        # The model's: logits row p predicts position p + logits_offset.
        self.logits_offset = logits_offset
        self.params = params
        self.grid = block_grid(prompt_len, params, block_causal)
        self.mask_id = mask_id
        self.row = row
        self.canvas = [mask_id] * self.grid.canvas_length
        self.block = 0
        self.step_in_block = 0
        self.emitted = 0
        # The pages hold none of this request's K/V (new or resumed request), but for
        # its first `cached` positions (whole prompt blocks from vLLM's prefix cache).
        self.needs_refresh = True
        self.cached = cached
        # Forwards so far, and how many tokens the last one committed.
        self.iterations = 0
        self.last_commits = 0
        # The leftmost position (absolute) the last forward committed, if any.
        self.previous_commit: int | None = None
        # Per committed canvas position not yet returned, its logprob record
        # (`sampling.logprobs`), for a request that asked for logprobs.
        self.logprobs: dict[int, list[int]] | None = {} if keeps_logprobs else None
        # ES keep fraction per layer, from the parameters on first use.
        self._es_fractions: list[float] | None = None

    @property
    def block_start(self) -> int:
        """The current block's start, relative to the canvas (negative when a
        block-diffusion model's first block starts inside the prompt)."""
        return self.grid.block_start(self.block) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.block >= self.grid.num_blocks

    @property
    def sequence_length(self) -> int:
        return self.grid.sequence_length

    def _full(self) -> bool:
        """Whether this iteration recomputes its whole window in every layer."""
        p = self.params
        if self.needs_refresh or refreshes(p.cache, self.step_in_block, p.refresh_period,
                                           self.iterations):
            return True
        if p.skip == "es":
            return bool(p.es_block_update_freq) and self.iterations % p.es_block_update_freq == 0
        if p.skip == "dyllm":
            return self.iterations < p.dyllm_full_steps
        return True

    def recompute_range(self) -> tuple[int, int]:
        """Absolute [lo, hi) this iteration's first layer computes: the scheduler's charge,
        the metrics' recomputed rows and the runner's layout all read it."""
        p = self.params
        lo, hi = cache_window(p.cache, self.prompt_len, p.gen_length, self.block_start,
                              p.block_length, self.step_in_block, self.needs_refresh,
                              self.logits_offset, p.refresh_period, self.iterations,
                              self.previous_commit)
        if p.skip == "dyllm" and p.cache == "none" and not self._full():
            # DyLLM queries the whole sequence at its 1-based steps n, 2n, 3n, ... and during
            # its first n, the canvas (from the row predicting its first position) otherwise
            # (`prepare_sparse` in younjoo0614/DyLLM's engine/model_runner.py, n = 4).
            step = self.iterations + 1
            if step > p.dyllm_query_period and step % p.dyllm_query_period:
                lo = max(0, self.prompt_len - self.logits_offset)
        return lo, hi

    def segments(self) -> list[tuple[int, int, int]]:
        """This iteration's query segments: absolute [lo, hi) and the key length they
        attend to (positions [0, key length) of the request's pages); the scheduler's
        charge, the metrics' recomputed rows and the runner's layout all read it.

        A bidirectional model has one segment, `recompute_range`, over the whole
        sequence. A block-causal one (block diffusion, arXiv:2503.09573 §3) computes
        its current block, whose rows see the blocks up to its end; on the first
        iteration of a block also the block just finished, with its final tokens, whose
        rows see up to their own end: those K/V are exact and never recomputed (SDAR's
        `generate` spends a separate forward on them; here they share the next
        iteration's). A new or resumed request computes every block before its current
        one that its pages lack, one segment each.
        """
        if not self.grid.block_causal:
            lo, hi = self.recompute_range()
            return [(lo, hi, self.sequence_length)]
        b = self.grid.block_length
        start = self.grid.block_start(self.block)
        if self.needs_refresh:
            first = self.cached
        elif self.step_in_block == 0 and self.block > 0:
            first = start - b
        else:
            first = start
        return [(lo, lo + b, lo + b) for lo in range(first, start + 1, b)]

    def rows(self) -> int:
        """The rows this iteration's first layer computes."""
        return sum(hi - lo for lo, hi, _ in self.segments())

    def skip_plan(self, n_layers: int, window: int) -> RequestSkip:
        p = self.params
        sparse = p.skip != "none" and not self._full()
        if p.skip != "es":
            return RequestSkip(p, sparse)
        if self._es_fractions is None:
            self._es_fractions = es.layer_fractions(p.es_keep, p.es_depth, n_layers)
        fractions = self._es_fractions
        layers = tuple(i for i in range(1, n_layers) if fractions[i] < fractions[i - 1])
        counts = es.keep_counts(fractions, window, self.last_commits,
                                p.block_length) if sparse else {}
        return RequestSkip(p, sparse, counts, layers)

    def _block_cells(self) -> tuple[int, int]:
        """The current block's (first canvas index, prompt columns before it)."""
        start = self.block_start
        return max(start, 0), max(-start, 0)

    def masked_columns(self) -> list[int]:
        """Columns of the current block that are still masks."""
        first, before = self._block_cells()
        block = self.canvas[first : first + self.params.block_length - before]
        return [before + c for c, token in enumerate(block) if token == self.mask_id]

    def apply(self, packed: list[int], records: list[int] | None = None) -> list[int]:
        """Take one iteration's packed result (the block's tokens, then whether the
        request moved to its next block) and, with logprobs, its block columns'
        records side by side; returns the tokens that became final."""
        first, before = self._block_cells()
        tokens = packed[before : self.params.block_length]
        old = self.canvas[first : first + len(tokens)]
        changed = [c for c, (a, b) in enumerate(zip(old, tokens)) if a != b]
        if self.logprobs is not None and records is not None:
            size = len(records) // (len(packed) - 1)
            for c in changed:
                column = before + c
                self.logprobs[first + c] = records[column * size : (column + 1) * size]
        self.last_commits = len(changed)
        self.previous_commit = self.prompt_len + first + changed[0] if changed else None
        self.canvas[first : first + len(tokens)] = tokens
        self.needs_refresh = False
        self.iterations += 1
        if packed[-1]:
            self.block += 1
            self.step_in_block = 0
        else:
            self.step_in_block += 1
        begin = self.emitted
        while self.emitted < len(self.canvas) and self.canvas[self.emitted] != self.mask_id:
            self.emitted += 1
        return self.canvas[begin : self.emitted]

    def take_logprobs(self, n: int) -> list[list[int]]:
        """The records of the last `n` returned tokens (none without logprobs)."""
        if self.logprobs is None:
            return []
        return [self.logprobs.pop(p) for p in range(self.emitted - n, self.emitted)]
