"""LLaDA (GSAI-ML/LLaDA-8B-Instruct, -Base, 1.5) on vLLM's parallel layers.

A Llama-style decoder whose attention is fully bidirectional: every position
attends to every position of its request (prompt, committed tokens, masks).
Logits row p predicts position p (no shift). Weights load from the original
checkpoint names (`model.transformer.blocks.N.q_proj`, `attn_out`, `ff_proj` =
gate, `up_proj`, block `ff_out` = down, `ln_f`, top-level `ff_out` = head).
"""

import torch

from vllm.config import VllmConfig
from vllm.model_executor.layers.rotary_embedding import get_rope

from vllm_dllm.configs.llada import LLaDAConfig
from vllm_dllm.model_executor.decoder import (
    DecoderLayer,
    DllmForMaskedLM,
    DllmTransformer,
    GatedMLP,
    ProjectedAttention,
)


class LLaDAAttention(ProjectedAttention):
    def __init__(self, config: LLaDAConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__(
            hidden_size=config.d_model, total_num_heads=config.n_heads,
            total_num_kv_heads=config.n_kv_heads, head_dim=config.d_model // config.n_heads,
            qkv_bias=config.include_bias or config.include_qkv_bias,
            o_bias=config.include_bias, vllm_config=vllm_config, prefix=prefix)
        # LLaDA rotates q and k in fp32 (`rope_full_precision`).
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_sequence_length, is_neox_style=True,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            dtype=torch.float32)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.rotary_emb(positions, x.float())[0].to(x.dtype)


def _module_name(name: str) -> str:
    """Original LLaDA weight name -> this module's parameter name."""
    if name == "model.transformer.ff_out.weight":
        return "lm_head.weight"
    name = name.replace("model.transformer.wte.", "model.embed_tokens.")
    name = name.replace("model.transformer.ln_f.", "model.norm.")
    name = name.replace("model.transformer.blocks.", "model.layers.")
    for old, new in (
        (".attn_norm.", ".input_layernorm."),
        (".ff_norm.", ".post_attention_layernorm."),
        (".attn_out.", ".self_attn.o_proj."),
        (".ff_out.", ".mlp.down_proj."),
    ):
        name = name.replace(old, new)
    return name


class LLaDAModelLM(DllmForMaskedLM):
    dllm_logits_offset = 0
    stacked = {
        ".q_proj.": (".self_attn.q_proj.", None),
        ".k_proj.": (".self_attn.kv_proj.", "k"),
        ".v_proj.": (".self_attn.kv_proj.", "v"),
        ".ff_proj.": (".mlp.gate_up_proj.", 0),
        ".up_proj.": (".mlp.gate_up_proj.", 1),
    }
    module_name = staticmethod(_module_name)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        if config.weight_tying:
            raise ValueError("LLaDA checkpoints with weight_tying are not supported")
        layers = (DecoderLayer(
            config.d_model, config.rms_norm_eps,
            LLaDAAttention(config, vllm_config, prefix=f"model.layers.{i}.self_attn"),
            GatedMLP(config.d_model, config.mlp_hidden_size, config.include_bias,
                     prefix=f"model.layers.{i}.mlp"))
            for i in range(config.n_layers))
        super().__init__(DllmTransformer(config.embedding_size, config.d_model,
                                         config.rms_norm_eps, layers, prefix="model"),
                         config.embedding_size, config.d_model)
        self.config = config
