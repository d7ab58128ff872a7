"""The samplers' top-k / top-p truncation of tempered logits, batched.

Both orders keep a prefix of the same descending order, so each does one sort:

* `top_p_top_k`, Dream's (`diffusion_generate`, Dream-org's `generation_utils.py`): the
  nucleus of the whole distribution, then the k largest of it.
* `top_k_top_p`, SDAR's `sample_with_temperature_topk_topp` (github JetAstra/SDAR,
  generate.py) and LLaDA2's (inclusionAI's `modeling_llada2_moe.py`): the k largest, then
  the nucleus of the softmax of what top-k kept.

A token stays in the nucleus iff the mass of the tokens ranked before it is at most p (the
first always stays). Removed tokens become -inf. Per-row settings are tensors: top_p [M]
(1 = off), top_k [M] integer (0 = off: else keep the tokens whose value is >= the k-th
largest). Plain PyTorch, no host synchronisation.
"""

import torch


def _below_kth(values: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Of rows sorted in descending order, the entries top-k removes."""
    k = top_k.long().clamp(max=values.shape[-1])
    kth = values.gather(-1, (k - 1).clamp(min=0)[:, None])
    return (k[:, None] > 0) & (values < kth)


def _outside_nucleus(before: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    p = top_p.to(torch.float64)[:, None]
    drop = (p < 1) & (before > p)
    drop[:, 0] = False
    return drop


def _remove(scaled: torch.Tensor, order: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """`scaled` with the entries `drop` marks in sorted `order` at -inf."""
    removed = torch.zeros_like(drop).scatter_(-1, order, drop)
    return scaled.masked_fill(removed, float("-inf"))


def top_p_top_k(scaled: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Dream's order on `scaled` [M, V] float64 (tempered logits)."""
    values, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    probs = torch.softmax(values, dim=-1)
    drop = _outside_nucleus(torch.cumsum(probs, dim=-1) - probs, top_p)
    return _remove(scaled, order, drop | _below_kth(values, top_k))


def top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """SDAR's and LLaDA2's order on `scaled` [M, V] float64 (tempered logits)."""
    values, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    drop = _below_kth(values, top_k)
    probs = torch.softmax(values.masked_fill(drop, float("-inf")), dim=-1)
    # The mass before each token, as the originals shift their inclusive cumsum right.
    before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(-1)[:, :-1]], dim=-1)
    return _remove(scaled, order, drop | _outside_nucleus(before, top_p))
