"""SDAR (JetLM/SDAR-*-Chat, arXiv:2510.06303) on vLLM's parallel layers.

Qwen3's decoder (per-head RMSNorm of q and k before RoPE, GQA, no biases, SwiGLU,
optionally tied embeddings; JetLM's `modeling_sdar.py`) under block-causal attention: a
position sees every position of its own block and of the blocks before it, blocks of
`block_size` cut from position 0. Logits row p predicts position p (SDAR's `generate.py`
reads a masked position's own row). The registry marks it block-causal and the config
gives its block (`SDARConfig.dllm_block_length`); the engine lays the blocks out as query
segments, so nothing here masks attention. Weights load
from the original names, which are Qwen3's: k/v into one `kv_proj` (q stays apart, see
`decoder.ProjectedAttention`), gate/up into `gate_up_proj`.
"""

import torch

from vllm.config import VllmConfig
from vllm.model_executor.layers.rotary_embedding import get_rope

from vllm_dllm.configs.sdar import SDARConfig
from vllm_dllm.model_executor.decoder import (
    DecoderLayer,
    DllmForMaskedLM,
    DllmTransformer,
    GatedMLP,
    ProjectedAttention,
)


class SDARAttention(ProjectedAttention):
    def __init__(self, config: SDARConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__(
            hidden_size=config.hidden_size, total_num_heads=config.num_attention_heads,
            total_num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            qkv_bias=config.attention_bias, o_bias=False, vllm_config=vllm_config,
            prefix=prefix, qk_norm_eps=config.rms_norm_eps)
        # cos/sin in the activation dtype, as Qwen3's rotary embedding casts them.
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
            rope_parameters=getattr(config, "rope_parameters", None)
            or {"rope_type": "default", "rope_theta": config.rope_theta})

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.rotary_emb(positions, x)[0]


class SDARForCausalLM(DllmForMaskedLM):
    dllm_logits_offset = 0
    # Qwen3's names are this module's, but for the fused projections (q stays apart).
    stacked = {
        ".k_proj.": (".kv_proj.", "k"),
        ".v_proj.": (".kv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        if config.hidden_act != "silu":
            raise ValueError(f"SDAR checkpoints with hidden_act={config.hidden_act!r} "
                             "are not supported (only silu)")
        layers = (DecoderLayer(
            config.hidden_size, config.rms_norm_eps,
            SDARAttention(config, vllm_config, prefix=f"model.layers.{i}.self_attn"),
            GatedMLP(config.hidden_size, config.intermediate_size, False,
                     prefix=f"model.layers.{i}.mlp"))
            for i in range(config.num_hidden_layers))
        super().__init__(DllmTransformer(config.vocab_size, config.hidden_size,
                                         config.rms_norm_eps, layers, prefix="model"),
                         config.vocab_size, config.hidden_size,
                         tie_word_embeddings=config.tie_word_embeddings)
        self.config = config
