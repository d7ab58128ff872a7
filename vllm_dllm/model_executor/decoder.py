"""The layer loop every dLLM architecture shares, and the hook a row controller uses.

A model file defines its decoder layer and calls `run_layers`; which rows each
layer computes (and what stands in for the rest) is decided by the pass's
`RowController`, never by the model file, so a second architecture reuses token
skipping as it is. A decoder layer exposes the parts a controller may drive one
by one (`DecoderLayer`); `layer(positions, x)` is the plain, all-rows path.
"""

from typing import Protocol

import torch
from torch import nn


class DecoderLayer(Protocol):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)).

    `self_attn.project(positions, h)` returns the post-RoPE q, k, v rows;
    `self_attn.attn` is vLLM's `Attention` (its backend writes K/V to the pages);
    `self_attn.o_proj` the output projection.
    """

    input_layernorm: nn.Module
    self_attn: nn.Module
    post_attention_layernorm: nn.Module
    mlp: nn.Module

    def __call__(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class RowController(Protocol):
    def run(self, layers: nn.ModuleList, x: torch.Tensor, positions: torch.Tensor
            ) -> torch.Tensor:
        """Run `layers` over the pass's rows; returns the hidden states of the rows
        the last layer computed (in the order the controller reports them)."""
        ...


def run_layers(layers: nn.ModuleList, x: torch.Tensor, positions: torch.Tensor,
               rows: RowController | None = None) -> torch.Tensor:
    if rows is not None:
        return rows.run(layers, x, positions)
    for layer in layers:
        x = layer(positions, x)
    return x

