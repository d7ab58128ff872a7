"""Plain PyTorch SDAR (arXiv:2510.06303; JetLM/SDAR-8B-Chat's `modeling_sdar.py`): Qwen3's
decoder layer (per-head RMSNorm on q and k before RoPE, GQA, no biases, SwiGLU, optionally
tied embeddings) under block-causal attention, blocks of `block_size` cut from position 0.

Logits are not shifted: SDAR's `generate.py` (github JetAstra/SDAR) reads the prediction for
a masked position from that position's own row, as LLaDA does. The model reads the original
checkpoint (config.json + safetensors with Qwen3's weight names).
"""

from dataclasses import replace
from pathlib import Path

import torch

from dllm_reference.modeling import Layout, ReferenceDecoder
from vllm_dllm.configs.sdar import DEFAULT_BLOCK_SIZE


def block_length(config: dict) -> int:
    """The block size an SDAR checkpoint was trained with (config.json's `block_size`)."""
    return int(config.get("block_size") or DEFAULT_BLOCK_SIZE)


class ReferenceSDAR(ReferenceDecoder):
    """SDAR's checkpoint (Qwen3 names). `forward` is bidirectional unless given a
    `block_length`; `block_length(model.config)` is the model's own."""

    layout = Layout(
        embed="model.embed_tokens.weight",
        attn_norm="model.layers.{i}.input_layernorm.weight",
        q="model.layers.{i}.self_attn.q_proj", k="model.layers.{i}.self_attn.k_proj",
        v="model.layers.{i}.self_attn.v_proj", o="model.layers.{i}.self_attn.o_proj.weight",
        ffn_norm="model.layers.{i}.post_attention_layernorm.weight",
        gate="model.layers.{i}.mlp.gate_proj.weight", up="model.layers.{i}.mlp.up_proj.weight",
        down="model.layers.{i}.mlp.down_proj.weight", final_norm="model.norm.weight",
        head="lm_head.weight", rope_full_precision=False,
        q_norm="model.layers.{i}.self_attn.q_norm.weight",
        k_norm="model.layers.{i}.self_attn.k_norm.weight")

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor],
                 trainable: bool = False):
        n_heads = config["num_attention_heads"]
        if config.get("tie_word_embeddings"):
            # A tied checkpoint has no lm_head.weight; the head reads the embedding.
            self.layout = replace(self.layout, head=self.layout.embed)
        super().__init__(config, state_dict, n_layers=config["num_hidden_layers"],
                         n_heads=n_heads, n_kv_heads=config.get("num_key_value_heads") or n_heads,
                         head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
                         eps=config.get("rms_norm_eps", 1e-6),
                         theta=config.get("rope_theta", 1e6), trainable=trainable)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        trainable: bool = False) -> "ReferenceSDAR":
        return cls(*cls.load(path, dtype), trainable=trainable)
