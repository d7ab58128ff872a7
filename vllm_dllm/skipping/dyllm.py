"""DyLLM salient-token recompute (arXiv:2603.08026; younjoo0614/DyLLM): which rows a layer really computes.

After the first `full_steps` iterations of a request, a layer computes K/V only
for its salient rows, which get exact attention; every other query row keeps its
cached context plus the change the salient rows' values bring
(`attention_backends.paged_attention.DeltaRows`). The rows whose attention context
moved (cosine similarity to the cached one below tau) are the salient set of the
layer's FFN and of the next layer's K/V; the other rows add their cached FFN
output. The first layer's salient rows are the positions the previous iteration
committed: only their input changed.

As in DyLLM's code, the rows of a layer's salient set are not forced into the next
one (the similarity test decides alone). tau >= 1 makes every row salient, the
first layer's too: the pass is then exactly the plain one.
"""

from collections.abc import Callable

import torch


def salient(context: torch.Tensor, cached: torch.Tensor, tau: torch.Tensor,
            all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Rows [N] whose context [N, D] has cosine similarity below `tau` [N] to `cached`.

    Under tensor parallelism each rank holds some heads of the context; `all_reduce`
    sums the three partial dot products over the ranks, so every rank takes the
    cosine of the whole context and picks the same rows.
    """
    c, old = context.float(), cached.float()
    sums = torch.stack([(c * old).sum(-1), (c * c).sum(-1), (old * old).sum(-1)], dim=-1)
    if all_reduce is not None:
        sums = all_reduce(sums)
    cos = sums[:, 0] / (sums[:, 1].sqrt() * sums[:, 2].sqrt()).clamp(min=1e-12)
    return (cos < tau) | (tau >= 1)
