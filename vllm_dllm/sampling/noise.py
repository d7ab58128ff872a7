"""Per-request randomness: Gumbel-max sampling and random remasking scores.

Each request draws from its own generator, in a fixed order per iteration:
uniforms for all rows of its current block ([block_length, V], float64) when
temperature > 0, then one score per block row when remasking is `random`. The
draw does not depend on which rows are still masked, so a seeded request
produces the same tokens whatever else shares its batch.
"""

import torch


def gumbel_argmax(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """argmax of exp(l) / (-log u)^T in float64: a sample of softmax(l / T) (spec §1.3)."""
    noisy = logits.double().exp() / (-uniforms.log()) ** temperature
    return noisy.argmax(-1)


def block_uniforms(generator: torch.Generator, block_length: int, vocab_size: int) -> torch.Tensor:
    return torch.rand((block_length, vocab_size), generator=generator, dtype=torch.float64)


def random_scores(generator: torch.Generator, block_length: int) -> torch.Tensor:
    return torch.rand(block_length, generator=generator, dtype=torch.float64)
