"""Where a request's blocks lie: the one rule for both kinds of model.

LLaDA and Dream decode semi-autoregressively: blocks of `block_length` start where
the prompt ends, and the canvas is `gen_length` long (arXiv:2502.09992 Appendix B).
Block-diffusion models (SDAR arXiv:2510.06303, LLaDA2; BD3-LM arXiv:2503.09573) were
trained with block-causal attention over blocks cut from position 0, so their blocks
stay on that grid: the first block to decode may start inside the prompt (its prompt
columns are never masks), and the sequence ends at the first block boundary that
holds prompt + `gen_length` (`num_blocks` in SDAR's and LLaDA2's `generate`).
"""

from dataclasses import dataclass

from vllm_dllm.params import DllmParams


@dataclass(frozen=True)
class BlockGrid:
    prompt_len: int
    # Absolute position where the request's first decoded block starts.
    origin: int
    block_length: int
    num_blocks: int
    steps_per_block: int
    block_causal: bool

    @property
    def sequence_length(self) -> int:
        """Prompt + canvas: the positions the request holds pages for."""
        return self.origin + self.num_blocks * self.block_length

    @property
    def canvas_length(self) -> int:
        return self.sequence_length - self.prompt_len

    def refresh_rows(self, block: int) -> int:
        """The rows an iteration at `block` computes when the pages hold none of the
        request's K/V (it joins or resumes): the whole sequence, or for a block-causal
        model every block up to the current one (`RequestState.segments`)."""
        if not self.block_causal:
            return self.sequence_length
        return self.block_start(block) + self.block_length

    def block_start(self, block: int) -> int:
        """Absolute start of decoded block `block` (0: the first)."""
        return self.origin + block * self.block_length


def block_grid(prompt_len: int, params: DllmParams, block_causal: bool) -> BlockGrid:
    """The blocks of a request; for block-causal models `steps` counts per block, as in
    SDAR's and LLaDA2's `generate` (LLaDA's counts over the whole canvas)."""
    b = params.block_length
    if not block_causal:
        return BlockGrid(prompt_len, prompt_len, b, params.num_blocks, params.steps_per_block,
                         False)
    origin = prompt_len // b * b
    end = -(-(prompt_len + params.gen_length) // b) * b
    return BlockGrid(prompt_len, origin, b, (end - origin) // b, params.steps, True)
