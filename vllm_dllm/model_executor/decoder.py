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
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

from vllm_dllm.attention_backends.bidirectional import BidirectionalAttentionBackend


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: `gate_up_proj` (merged), SiLU-and-multiply, `down_proj`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


def kv_parallel_linear(hidden_size: int, head_dim: int, total_num_kv_heads: int, bias: bool,
                       prefix: str) -> QKVParallelLinear:
    """The K and V projections as one GEMM: vLLM's `QKVParallelLinear` with no query
    heads, so it keeps vLLM's K/V sharding (a rank's KV heads, or a replica of one when
    there are fewer KV heads than ranks) and loads the checkpoint's `k`/`v` shards."""
    return QKVParallelLinear(hidden_size, head_dim, 0, total_num_kv_heads, bias=bias,
                             prefix=prefix)


class ProjectedAttention(nn.Module):
    """Attention with separate `q_proj` and `kv_proj` (from `kv_parallel_linear`;
    `kv_size` is a rank's K width), `rotate(positions, x)` (the model's RoPE on q or k
    rows), `attn` (vLLM's `Attention`: its backend writes K/V to the pages) and
    `o_proj`. Q and K/V are separate GEMMs so that a row controller can project K/V
    for a subset of the rows (DyLLM); a row controller may call these parts one by one.

    The constructor builds the projections and `attn` on a rank's share of the heads
    (fewer KV heads than ranks: each rank keeps a replica of one); a model's subclass
    adds its rotary embedding and `rotate`."""

    def __init__(self, *, hidden_size: int, total_num_heads: int, total_num_kv_heads: int,
                 head_dim: int, qkv_bias: bool, o_bias: bool, vllm_config: VllmConfig,
                 prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.head_dim = head_dim
        self.num_heads = total_num_heads // tp_size
        self.num_kv_heads = max(1, total_num_kv_heads // tp_size)
        self.kv_size = self.num_kv_heads * head_dim
        self.q_proj = ColumnParallelLinear(hidden_size, total_num_heads * head_dim,
                                           bias=qkv_bias, prefix=f"{prefix}.q_proj")
        self.kv_proj = kv_parallel_linear(hidden_size, head_dim, total_num_kv_heads, qkv_bias,
                                          prefix=f"{prefix}.kv_proj")
        self.o_proj = RowParallelLinear(total_num_heads * head_dim, hidden_size, bias=o_bias,
                                        prefix=f"{prefix}.o_proj")
        self.attn = Attention(
            self.num_heads, head_dim, head_dim**-0.5, num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn",
            attn_backend=BidirectionalAttentionBackend)

    def project(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                kv_rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-RoPE q of every row; k, v of the rows `kv_rows` (indices; None: all)."""
        q, _ = self.q_proj(hidden_states)
        kv_positions = positions
        if kv_rows is not None:
            hidden_states, kv_positions = hidden_states[kv_rows], positions[kv_rows]
        kv, _ = self.kv_proj(hidden_states)
        k, v = kv.split([self.kv_size, self.kv_size], dim=-1)
        return self.rotate(positions, q), self.rotate(kv_positions, k), v

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

