"""The layer loop every dLLM architecture shares, and the hook a row controller uses.

A model file builds its layers on `DecoderLayer`, `ProjectedAttention` and
`GatedMLP` (their forwards are the plain, all-rows path) and calls `run_layers`;
which rows each layer computes (and what stands in for the rest) is decided by the
pass's `RowController`, never by the model file, so a second architecture reuses
token skipping as it is.
"""

from typing import Protocol

import torch
from torch import nn


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: `gate_up_proj` (merged), SiLU-and-multiply, `down_proj`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class ProjectedAttention(nn.Module):
    """Attention whose `project(positions, h)` gives the post-RoPE q, k, v rows;
    `attn` is vLLM's `Attention` (its backend writes K/V to the pages), `o_proj`
    the output projection. A row controller may call these parts one by one."""

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        out, _ = self.o_proj(self.attn(*self.project(positions, hidden_states)))
        return out


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)), from its
    `input_layernorm`, `self_attn`, `post_attention_layernorm` and `mlp`; calling it
    is the plain, all-rows path."""

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


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

