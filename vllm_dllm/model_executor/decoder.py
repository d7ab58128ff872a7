"""What every dLLM architecture shares: layers, the layer loop, the model around them.

A model file subclasses `ProjectedAttention` with its rotary embedding, builds its
layers as `DecoderLayer`s of that and a `GatedMLP`, puts them in a
`DllmTransformer` and subclasses `DllmForMaskedLM` with its checkpoint's weight
names. The layer loop is the model's own (`run_layers`); a token-skipping method is
a `LayerHook` asked between layers which rows go on, and whether a layer is
`SparseRows` (which rows refresh K/V and run the FFN). The model file never sees
a skipping method, so a new architecture reuses them as they are.
"""

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from vllm_dllm.attention_backends.bidirectional import BidirectionalAttentionBackend


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: `gate_up_proj` (merged), SiLU-and-multiply, `down_proj`."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=bias, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

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
    `o_proj`. Q and K/V are separate GEMMs so that a sparse layer can project K/V
    for a subset of the rows (DyLLM).

    The constructor builds the projections and `attn` on a rank's share of the heads
    (fewer KV heads than ranks: each rank keeps a replica of one); a model's subclass
    adds its rotary embedding and `rotate`. `qk_norm_eps` adds Qwen3's per-head RMSNorm
    of q and k before RoPE (`q_norm`, `k_norm`, one gain of head_dim each)."""

    def __init__(self, *, hidden_size: int, total_num_heads: int, total_num_kv_heads: int,
                 head_dim: int, qkv_bias: bool, o_bias: bool, vllm_config: VllmConfig,
                 prefix: str, qk_norm_eps: float | None = None):
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
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, eps=qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=qk_norm_eps)

    def _per_head(self, norm: RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
        if norm is None:
            return x
        return norm(x.view(*x.shape[:-1], -1, self.head_dim)).view(x.shape)

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
        q, k = self._per_head(self.q_norm, q), self._per_head(self.k_norm, k)
        return self.rotate(positions, q), self.rotate(kv_positions, k), v

    def context(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                kv_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The attention output of every row before `o_proj`; only `kv_rows` write K/V."""
        return self.attn(*self.project(positions, hidden_states, kv_rows))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        out, _ = self.o_proj(self.context(positions, hidden_states))
        return out


class SparseRows(Protocol):
    """A layer where only some rows refresh K/V and run the FFN (DyLLM, arXiv:2603.08026).

    `kv_rows` (indices) project and write K/V; every row is a query. `ffn(context)`
    names, from the rows' attention contexts, the rows that run the FFN, and gives
    the output that stands in for it in every row; `computed` receives what those
    rows' FFN produced."""

    kv_rows: torch.Tensor

    def ffn(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def computed(self, rows: torch.Tensor, out: torch.Tensor) -> None: ...


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden_size: int, rms_norm_eps: float, self_attn: "ProjectedAttention",
                 mlp: GatedMLP):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps)
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                sparse: SparseRows | None = None) -> torch.Tensor:
        h = self.input_layernorm(x)
        if sparse is None:
            x = x + self.self_attn(positions, h)
            return x + self.mlp(self.post_attention_layernorm(x))
        context = self.self_attn.context(positions, h, sparse.kv_rows)
        out, _ = self.self_attn.o_proj(context)
        x = x + out
        rows, ffn = sparse.ffn(context)
        if len(rows):
            computed = self.mlp(self.post_attention_layernorm(x[rows]))
            ffn = ffn.index_copy(0, rows, computed)
            sparse.computed(rows, computed)
        return x + ffn


class LayerHook(Protocol):
    """A pass's row controller, asked before and after each layer: which rows the
    layer computes (`positions`), whether it is sparse, and which rows go on."""

    positions: torch.Tensor

    def before(self, layer: int) -> SparseRows | None: ...

    def after(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...


def run_layers(layers: nn.ModuleList, x: torch.Tensor, positions: torch.Tensor,
               hook: LayerHook | None = None) -> torch.Tensor:
    """The layer loop; with a `hook`, the rows each layer computes are the hook's."""
    for i, layer in enumerate(layers):
        if hook is None:
            x = layer(positions, x)
        else:
            x = hook.after(i, layer(hook.positions, x, hook.before(i)))
    return x


class DllmTransformer(nn.Module):
    """`model.*`: token embeddings, the decoder layers, the final norm."""

    def __init__(self, vocab_size: int, hidden_size: int, rms_norm_eps: float,
                 layers: Iterable[nn.Module], prefix: str):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(vocab_size, hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden_size, eps=rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                rows: LayerHook | None = None) -> torch.Tensor:
        return self.norm(run_layers(self.layers, self.embed_tokens(input_ids), positions, rows))


class DllmForMaskedLM(nn.Module):
    """A `DllmTransformer` with its head (`tie_word_embeddings`: the embedding's matrix),
    as vLLM's model runner calls it.

    A subclass declares `dllm_logits_offset` (logits row p predicts position
    p + offset), `stacked` (checkpoint name fragment -> this module's fused parameter
    fragment and shard id; None: the whole parameter) and, where its checkpoint names
    are not this module's, `module_name`.
    """

    dllm_logits_offset: int
    stacked: dict[str, tuple[str, str | int | None]]

    def __init__(self, model: DllmTransformer, vocab_size: int, hidden_size: int,
                 tie_word_embeddings: bool = False):
        super().__init__()
        self.model = model
        self.tie_word_embeddings = tie_word_embeddings
        self.lm_head = (model.embed_tokens if tie_word_embeddings
                        else ParallelLMHead(vocab_size, hidden_size, prefix="lm_head"))
        self.logits_processor = LogitsProcessor(vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        rows: LayerHook | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, rows)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    @staticmethod
    def module_name(checkpoint_name: str) -> str:
        return checkpoint_name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for checkpoint_name, tensor in weights:
            name = self.module_name(checkpoint_name)
            if self.tie_word_embeddings and name.startswith("lm_head."):
                # Some tied checkpoints also store the head: the embedding's copy.
                continue
            for original, (fused, shard) in self.stacked.items():
                if original in name:
                    name = name.replace(original, fused)
                    param = params[name]
                    if shard is None:
                        param.weight_loader(param, tensor)
                    else:
                        param.weight_loader(param, tensor, shard)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded
