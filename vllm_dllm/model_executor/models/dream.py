"""Dream (Dream-org/Dream-v0-Instruct-7B, -Base-7B) on vLLM's parallel layers.

A Qwen2 decoder (q/k/v with bias, GQA, SwiGLU, untied `lm_head`) whose
attention is fully bidirectional (Dream-org's `modeling_dream.py`). Dream keeps Qwen's
autoregressive alignment: logits row p predicts position p + 1, which
the model declares with `dllm_logits_offset` and the decoding core applies.
Weights load from the original names, which are Qwen2's (`model.layers.N.
self_attn.q_proj`, ...): k/v into one `kv_proj` (q stays apart, see
`decoder.ProjectedAttention`), gate/up into `gate_up_proj`.
"""

import torch

from vllm.config import VllmConfig
from vllm.model_executor.layers.rotary_embedding import get_rope

from vllm_dllm.configs.dream import DreamConfig
from vllm_dllm.model_executor.decoder import (
    DecoderLayer,
    DllmForMaskedLM,
    DllmTransformer,
    GatedMLP,
    ProjectedAttention,
)


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


class DreamModel(DllmForMaskedLM):
    # Qwen's autoregressive alignment: logits row p predicts position p + 1.
    dllm_logits_offset = 1
    # Qwen2's names are this module's, but for the fused projections (q stays apart).
    stacked = {
        ".k_proj.": (".kv_proj.", "k"),
        ".v_proj.": (".kv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        if config.tie_word_embeddings:
            raise ValueError("Dream checkpoints with tie_word_embeddings are not supported")
        if config.hidden_act != "silu":
            raise ValueError(f"Dream checkpoints with hidden_act={config.hidden_act!r} "
                             "are not supported (only silu)")
        layers = (DecoderLayer(
            config.hidden_size, config.rms_norm_eps,
            DreamAttention(config, vllm_config, prefix=f"model.layers.{i}.self_attn"),
            GatedMLP(config.hidden_size, config.intermediate_size, False,
                     prefix=f"model.layers.{i}.mlp"))
            for i in range(config.num_hidden_layers))
        super().__init__(DllmTransformer(config.vocab_size, config.hidden_size,
                                         config.rms_norm_eps, layers, prefix="model"),
                         config.vocab_size, config.hidden_size)
        self.config = config
