"""The host-side record of one running request.

Parameters are parsed once, when the request joins; the decoding state itself
lives in the request's row of `DenoiseBatch`. This record mirrors what the host
needs to lay out the next iteration (block, step, which block columns are still
masks) and what it hands back to vLLM (the committed prefix of the canvas). It is
updated from the one packed transfer each iteration returns.
"""

from vllm_dllm.params import DllmParams
from vllm_dllm.sampling.recompute import recompute_range


class RequestState:
    def __init__(self, prompt_len: int, params: DllmParams, mask_id: int, row: int):
        self.prompt_len = prompt_len
        self.params = params
        self.mask_id = mask_id
        self.row = row
        self.canvas = [mask_id] * params.gen_length
        self.block = 0
        self.step_in_block = 0
        self.emitted = 0
        # The pages hold none of this request's K/V (new or resumed request).
        self.needs_refresh = True

    @property
    def block_start(self) -> int:
        return self.block * self.params.block_length

    @property
    def finished(self) -> bool:
        return self.block >= self.params.num_blocks

    @property
    def sequence_length(self) -> int:
        return self.prompt_len + self.params.gen_length

    def recompute_range(self) -> tuple[int, int]:
        """Absolute [lo, hi) this iteration recomputes."""
        return recompute_range(self.params.cache, self.prompt_len, self.params.gen_length,
                               self.block_start, self.params.block_length, self.step_in_block,
                               self.needs_refresh)

    def next_rows(self) -> int:
        """Rows the next iteration recomputes, if the cache still holds the request."""
        lo, hi = recompute_range(self.params.cache, self.prompt_len, self.params.gen_length,
                                 self.block_start, self.params.block_length, self.step_in_block)
        return hi - lo

    def masked_columns(self) -> list[int]:
        """Columns of the current block that are still masks."""
        start = self.block_start
        block = self.canvas[start : start + self.params.block_length]
        return [c for c, token in enumerate(block) if token == self.mask_id]

    def apply(self, packed: list[int]) -> list[int]:
        """Take one iteration's packed result (the block's tokens, then whether the
        request moved to its next block); returns the tokens that became final."""
        length = self.params.block_length
        start = self.block_start
        self.canvas[start : start + length] = packed[:length]
        self.needs_refresh = False
        if packed[-1]:
            self.block += 1
            self.step_in_block = 0
        else:
            self.step_in_block += 1
        begin = self.emitted
        while self.emitted < len(self.canvas) and self.canvas[self.emitted] != self.mask_id:
            self.emitted += 1
        return self.canvas[begin : self.emitted]
