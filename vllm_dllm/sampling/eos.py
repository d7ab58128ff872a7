"""LLaDA's optional end-of-text handling (`logits_eos_inf`, `confidence_eos_eot_inf`, LLaDA's `generate.py`).

Instruct LLaDA fills the tail of its canvas with EOS; these options keep it
from ending, or from ending early, by changing what the rules see.
"""

import torch


def suppress_eos_logits(logits: torch.Tensor, eos_id: int, rows: torch.Tensor) -> torch.Tensor:
    """`logits_eos_inf`: set the EOS column of the `rows` ([N] bool) of `logits` [N, V]
    to -inf, in place, and return `logits`.

    Apply before tokens are chosen (argmax or sampling) and before confidence is
    computed: EOS then is never predicted in those rows.
    """
    logits[:, eos_id] = logits[:, eos_id].masked_fill(rows, float("-inf"))
    return logits


def eos_eot_confidence(logits: torch.Tensor, tokens: torch.Tensor, eos_id: int, eot_id: int) -> torch.Tensor:
    """`confidence_eos_eot_inf`: confidence of `tokens` [N] with EOS and EoT taken out of the softmax.

    Tokens are chosen first, from the unchanged logits [N, V]; then the
    confidence (float64) is the chosen token's probability under a softmax
    whose EOS and EoT logits are -inf. A position that predicts EOS or EoT
    gets confidence 0, so it goes last, and the other probabilities are
    renormalised over the remaining vocabulary.

    Gotcha G1: the reference writes
    `logits_with_noise[:, :, eos] = logits[:, :, eot] = -inf` after choosing
    x0, then takes the softmax of `logits`. At temperature 0
    `logits_with_noise` *is* `logits` (the noise function returns its input),
    so both ids drop out of the softmax; at temperature > 0 it is a separate
    tensor and only EoT does. We follow the stated intent, "EOS and EoT", at
    every temperature: this is exactly the reference at temperature 0, and at
    temperature > 0 it differs from it only in also zeroing EOS.

    The value is 0, the probability the reference ends up with, rather than
    -inf: -inf marks a non-candidate for the rules in `policies`, and a block
    whose last masks all predict EOS could then never be finished.
    """
    dropped = logits.to(torch.float64, copy=True)
    dropped[..., eos_id] = float("-inf")
    dropped[..., eot_id] = float("-inf")
    chosen = dropped.gather(-1, tokens[:, None]).squeeze(-1)
    return (chosen - torch.logsumexp(dropped, dim=-1)).exp()
