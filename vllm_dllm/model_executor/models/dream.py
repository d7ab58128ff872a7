"""Dream (Dream-org/Dream-v0-Instruct-7B, -Base-7B) on vLLM's parallel layers.

A Qwen2 decoder (q/k/v with bias, GQA, SwiGLU, untied `lm_head`) whose
attention is fully bidirectional (models.md §2.3). Dream keeps Qwen's
autoregressive alignment: logits row p predicts position p + 1 (§2.4), which
the model declares with `dllm_logits_offset` and the decoding core applies.
Weights load from the original names, which are Qwen2's (`model.layers.N.
self_attn.q_proj`, ...): k/v into one `kv_proj` (q stays apart, see
`decoder.ProjectedAttention`), gate/up into `gate_up_proj`.
"""

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors

from vllm_dllm.configs.dream import DreamConfig
from vllm_dllm.model_executor.decoder import (
    DecoderLayer,
    GatedMLP,
    ProjectedAttention,
    RowController,
    run_layers,
)


class DreamMLP(GatedMLP):
    def __init__(self, config: DreamConfig, prefix: str):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"Dream checkpoints with hidden_act={config.hidden_act!r} "
                             "are not supported (only silu)")
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=False,
            prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=False,
            prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()


class DreamAttention(ProjectedAttention):
    def __init__(self, config: DreamConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__(
            hidden_size=config.hidden_size, total_num_heads=config.num_attention_heads,
            total_num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            qkv_bias=True, o_bias=False, vllm_config=vllm_config, prefix=prefix)
        # cos/sin in the activation dtype, as Dream's rotary embedding casts them.
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
            rope_parameters=getattr(config, "rope_parameters", None)
            or {"rope_type": "default", "rope_theta": config.rope_theta})

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.rotary_emb(positions, x)[0]


class DreamDecoderLayer(DecoderLayer):
    def __init__(self, config: DreamConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DreamAttention(config, vllm_config, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = DreamMLP(config, prefix=f"{prefix}.mlp")


class DreamTransformer(nn.Module):
    """`model.*` of the checkpoint: embeddings, layers, final norm."""

    # checkpoint projection -> (fused parameter, shard id); q_proj keeps its name
    stacked_params_mapping = (
        (".kv_proj", ".k_proj", "k"),
        (".kv_proj", ".v_proj", "v"),
        (".gate_up_proj", ".gate_proj", 0),
        (".gate_up_proj", ".up_proj", 1),
    )

    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            DreamDecoderLayer(config, vllm_config, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                rows: RowController | None = None) -> torch.Tensor:
        return self.norm(run_layers(self.layers, self.embed_tokens(input_ids), positions, rows))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            for fused, original, shard in self.stacked_params_mapping:
                if original in name:
                    name = name.replace(original, fused)
                    param = params[name]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded


class DreamModel(nn.Module):
    # Row p of the logits predicts canvas position p + 1 (Qwen's AR alignment).
    dllm_logits_offset = 1

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if config.tie_word_embeddings:
            raise ValueError("Dream checkpoints with tie_word_embeddings are not supported")
        self.config = config
        self.model = DreamTransformer(vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        rows: RowController | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, rows)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)
