"""Rules that choose which masked positions of the current block to commit.

Every rule takes the whole batch at once: `confidence` is [B, K] float64 with
-inf wherever a position is not a candidate (outside the block or already
committed) and returns a [B, K] boolean commit mask.
"""

import torch


def rank_in_row(confidence: torch.Tensor) -> torch.Tensor:
    """Rank of each position by descending confidence; ties go to the lower position."""
    order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def select_fixed(confidence: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Commit the `counts[b]` most confident candidates of each row."""
    candidates = confidence > float("-inf")
    return candidates & (rank_in_row(confidence) < counts[:, None])
