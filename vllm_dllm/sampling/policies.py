"""Rules that choose which masked positions of the current block to commit.

Every rule takes the whole batch at once: `confidence` is [B, K] float64 with
-inf wherever a position is not a candidate (outside the block or already
committed) and returns a [B, K] boolean commit mask. Per-request parameters
are [B] tensors, so one call serves requests with different settings. Ties in
confidence go to the lower position everywhere, as in `rank_in_row`.

The rules (LLaDA arXiv:2502.09992; Fast-dLLM arXiv:2505.22618 §3.3;
Fast-dLLM++ arXiv:2606.02955):
* fixed:     LLaDA's schedule, the `counts[b]` most confident candidates.
* threshold: Fast-dLLM, every candidate with conf >= tau, and always the top-1.
* factor:    Fast-dLLM, the largest prefix of the sorted candidates with
             c(n) >= 1 - f / (n + 1) for every n in it (n >= 1).
* frechet:   Fast-dLLM++, the largest n with G_n = L_n - U_n > delta.
* sequential: SDAR (arXiv:2510.06303), the `counts[b]` leftmost candidates,
             whatever their confidence.
The threshold-type rules (all but fixed and sequential) commit at least one token whenever a
row has a candidate, so a block always makes progress.
"""

from dataclasses import dataclass

import torch

POLICIES = ("fixed", "threshold", "factor", "frechet", "sequential")


def _sort_desc(confidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row sorted by descending confidence, and each position's rank in it.

    The sort is stable, so equal confidences keep position order: the lower
    position gets the better rank.
    """
    values, order = torch.sort(confidence, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return values, ranks


def rank_in_row(confidence: torch.Tensor) -> torch.Tensor:
    """Rank of each position by descending confidence; ties go to the lower position."""
    return _sort_desc(confidence)[1]


def _top(confidence: torch.Tensor, ranks: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The `n[b]` best-ranked candidates of each row."""
    return (confidence > float("-inf")) & (ranks < n[:, None])


def select_fixed(confidence: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Commit the `counts[b]` most confident candidates of each row."""
    return _top(confidence, rank_in_row(confidence), counts)


def select_sequential(confidence: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Commit the `counts[b]` leftmost candidates of each row: SDAR's `sequential`
    remasking (JetAstra/SDAR `generate.py`), left to right inside the block."""
    candidates = confidence > float("-inf")
    return candidates & (torch.cumsum(candidates.long(), dim=-1) <= counts[:, None])


def select_threshold(confidence: torch.Tensor, threshold: torch.Tensor,
                     floor: torch.Tensor | None = None) -> torch.Tensor:
    """Commit every candidate with confidence >= `threshold[b]`, and always the row's
    `floor[b]` best (None: the top-1).

    The forced top-1 (the first maximum, i.e. the lower position on a tie) is
    what guarantees progress when nothing clears the threshold. A larger floor is
    LLaDA2's and SDAR's rule (`low_confidence_dynamic` in SDAR's `generate.py`): the
    candidates above the threshold, or the schedule's count of the best when fewer
    clear it.
    """
    candidates = confidence > float("-inf")
    if floor is None:
        best = torch.zeros_like(candidates).scatter_(-1, confidence.argmax(-1, keepdim=True), True)
    else:
        best = rank_in_row(confidence) < floor[:, None]
    return candidates & ((confidence >= threshold[:, None]) | best)


def select_factor(confidence: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Commit the largest n sorted candidates with c(k) >= 1 - f / (k + 1) for all k <= n.

    Condition and arithmetic follow the reference (`1 - factor / (n + 1)` in
    float64, accepted on equality); k = 1 always passes, so n >= 1.

    The reference loop (Fast-dLLM v1 `get_transfer_index_dynamic`) also
    commits the first failing candidate when it is the row's last one (its
    `top_i == len - 1` case cannot tell "no candidate failed" from "the last
    one failed"). We do not replicate that: it commits a token the rule has
    just rejected, and whether it happens depends only on how many masks are
    left (with two masks left the second is committed at any confidence),
    which breaks the rule's guarantee (Fast-dLLM Theorem 1). The cost is that
    in those steps we commit one token fewer than the reference.
    """
    values, ranks = _sort_desc(confidence)
    n = torch.arange(1, values.shape[-1] + 1, device=values.device, dtype=values.dtype)
    passes = values >= 1 - factor[:, None].to(values.dtype) / (n + 1)
    passes[:, 0] = True
    accepted = torch.cumprod((passes & (values > float("-inf"))).long(), dim=-1).sum(-1)
    return _top(confidence, ranks, accepted)


def select_frechet(confidence: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Commit the n* most confident candidates, n* = max{n : G_n > delta[b]}, at least 1.

    With c(1) >= c(2) >= ... the sorted candidate confidences,
    G_n = (sum_{j<=n} c(j) - (n - 1)) - (1 - c(n)): the Fréchet lower bound on
    all n being right minus the upper bound on any competitor (Fast-dLLM++, arXiv:2606.02955). As in
    the Fast-dLLM++ reference the max(0, .) of the lower bound is left out and
    n* is the number of n with G_n > delta, which is the largest such n
    because G_n never increases with n.
    """
    values, ranks = _sort_desc(confidence)
    valid = values > float("-inf")
    col = torch.arange(values.shape[-1], device=values.device, dtype=values.dtype)
    prefix = torch.cumsum(torch.where(valid, values, torch.zeros_like(values)), dim=-1)
    gap = (prefix - col) - (1 - values)
    gap = torch.where(valid, gap, torch.full_like(gap, float("-inf")))
    gap[:, 0] = float("inf")
    accepted = (gap > delta[:, None].to(gap.dtype)).sum(-1).clamp(min=1)
    return _top(confidence, ranks, accepted)


@dataclass(frozen=True)
class PolicyBatch:
    """Which rule each row of a batch uses, with that rule's parameter.

    All tensors are [B]; a row's entries for rules it does not use are
    ignored. `used` is kept on the host so `select` can skip unused rules
    without reading `policy` back from the device.
    """

    policy: torch.Tensor  # long, index into POLICIES
    counts: torch.Tensor  # long, tokens the fixed schedule wants this step
    threshold: torch.Tensor  # float64
    factor: torch.Tensor  # float64
    frechet_delta: torch.Tensor  # float64
    used: frozenset[str]
    floor: torch.Tensor | None = None  # long, the fewest the threshold rule commits (None: 1)


def select(confidence: torch.Tensor, batch: PolicyBatch) -> torch.Tensor:
    """Apply to each row the rule it asked for.

    Each rule in use runs on the whole batch and its rows are kept with
    torch.where: a handful of batched calls instead of one per request.
    """
    rules = {
        "fixed": lambda: select_fixed(confidence, batch.counts),
        "threshold": lambda: select_threshold(confidence, batch.threshold, batch.floor),
        "factor": lambda: select_factor(confidence, batch.factor),
        "frechet": lambda: select_frechet(confidence, batch.frechet_delta),
        "sequential": lambda: select_sequential(confidence, batch.counts),
    }
    commit = torch.zeros_like(confidence, dtype=torch.bool)
    for name in sorted(batch.used):
        rows = (batch.policy == POLICIES.index(name))[:, None]
        commit = torch.where(rows, rules[name](), commit)
    return commit
