"""The top-k / top-p truncation of the block-diffusion samplers, batched.

SDAR's `sample_with_temperature_topk_topp` (github JetAstra/SDAR, generate.py) and LLaDA2's
(inclusionAI's `modeling_llada2_moe.py`) temper the logits, keep the top k, then keep the
nucleus of what is left: a token stays iff the mass of the tokens ranked before it, under
the softmax of the top-k logits, is at most p (the first always stays). The token is drawn
from, and scored by, the softmax of what remains. Dream truncates in the other order
(`sampling/dream.py`). Plain PyTorch, no host synchronisation.
"""

import torch


def top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`scaled` [M, V] float64 (tempered logits) with the removed tokens at -inf.

    top_k [M] integer (0 = off): keep the tokens whose value is >= the k-th largest;
    top_p [M] (1 = off). Both keep a prefix of the same descending order, so one sort
    serves both; top-p's mass is that of the top-k survivors.
    """
    values, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    vocab = scaled.shape[-1]
    k = top_k.long().clamp(max=vocab)
    kth = values.gather(-1, (k - 1).clamp(min=0)[:, None])
    drop = (k[:, None] > 0) & (values < kth)
    probs = torch.softmax(values.masked_fill(drop, float("-inf")), dim=-1)
    # The mass before each token, as the originals shift their inclusive cumsum right.
    before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(-1)[:, :-1]], dim=-1)
    p = top_p.to(torch.float64)[:, None]
    drop |= (p < 1) & (before > p)
    drop[:, 0] = False
    removed = torch.zeros_like(drop).scatter_(-1, order, drop)
    return scaled.masked_fill(removed, float("-inf"))
