"""LLaDA's fixed transfer schedule (`get_num_transfer_tokens`, LLaDA's `generate.py`, arXiv:2502.09992 Appendix B)."""

import torch


def transfer_counts(num_masked: torch.Tensor, steps: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Tokens to commit at `step` of a block that started with `num_masked` masks.

    The block's masks are split evenly over `steps` iterations and the remainder
    goes to the earliest ones. All arguments are [B] integer tensors.
    """
    base = torch.div(num_masked, steps, rounding_mode="floor")
    return base + (step < num_masked - base * steps).long()
