"""What one request carries between denoising iterations."""

import torch

from vllm_dllm.params import DllmParams


class DenoiseState:
    """The canvas of one request and where it is in its block schedule.

    Canvas positions are relative to the end of the prompt: position 0 is the
    first generated token.
    """

    def __init__(
        self,
        prompt_len: int,
        params: DllmParams,
        mask_id: int,
        temperature: float,
        seed: int | None,
    ):
        self.prompt_len = prompt_len
        self.params = params
        self.mask_id = mask_id
        self.temperature = temperature
        self.canvas = torch.full((params.gen_length,), mask_id, dtype=torch.long)
        self.seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        self.block = 0
        self.step_in_block = 0
        self.block_start_masked = params.block_length
        self.emitted = 0
        self.iterations = 0

    @property
    def block_start(self) -> int:
        return self.block * self.params.block_length

    @property
    def block_end(self) -> int:
        return self.block_start + self.params.block_length

    @property
    def finished(self) -> bool:
        return self.block >= self.params.num_blocks

    def masked_in_block(self) -> torch.Tensor:
        """Canvas positions of the current block that are still masks, ascending."""
        block = self.canvas[self.block_start : self.block_end]
        return torch.nonzero(block == self.mask_id).flatten() + self.block_start

    def commit(self, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        """Write tokens at canvas positions and move the schedule on by one iteration."""
        self.canvas[positions] = tokens
        self.iterations += 1
        self.step_in_block += 1
        block_clean = not bool((self.canvas[self.block_start : self.block_end] == self.mask_id).any())
        # The fixed schedule runs all its steps even when the last ones commit
        # nothing (steps > block_length), as the reference does; the other
        # policies move on as soon as the block is clean.
        min_steps = self.params.steps_per_block if self.params.policy == "fixed" else 1
        if block_clean and self.step_in_block >= min_steps:
            self.block += 1
            self.step_in_block = 0
            if not self.finished:
                self.block_start_masked = int(
                    (self.canvas[self.block_start : self.block_end] == self.mask_id).sum())

    def take_new_tokens(self) -> list[int]:
        """Tokens newly final: the committed prefix of the canvas not yet handed out."""
        masked = torch.nonzero(self.canvas == self.mask_id)
        end = int(masked[0]) if len(masked) else self.params.gen_length
        tokens = self.canvas[self.emitted : end].tolist()
        self.emitted = max(self.emitted, end)
        return tokens
