"""Writes small SDAR checkpoints in the original Hugging Face format.

The folder holds what JetLM/SDAR-8B-Chat ships (config.json with its fields, among them
`block_size` and `mask_token_id`; generation_config.json; safetensors under Qwen3's
`model.layers.{i}.self_attn.q_norm.weight`-style names), only smaller, with the character
tokenizer of `tiny_llada` plus SDAR's mask token `<|MASK|>` (the name its
tokenizer_config.json gives it) and that vocabulary's chat template (LLaDA's markers, which
the task suite renders and the trained examples/sdar-long learnt).

    python -m dllm_reference.tiny_sdar OUT_DIR [--seed 0] [--hidden-size 64] ...
"""

import argparse
from pathlib import Path

import torch

from vllm_dllm.configs.sdar import DEFAULT_BLOCK_SIZE
from dllm_reference import tiny_llada
from dllm_reference.tiny_llada import SPECIAL_TOKENS, build_vocab

MASK_TOKEN = "<|MASK|>"
SDAR_SPECIAL_TOKENS = SPECIAL_TOKENS + [MASK_TOKEN]


def build_sdar_vocab() -> dict[str, int]:
    """tiny_llada's vocabulary with `<|MASK|>` last (it rounds up to the same 104 rows)."""
    vocab = build_vocab()
    vocab[MASK_TOKEN] = len(vocab)
    return vocab


def sdar_config(vocab: dict[str, int], *, hidden_size: int, num_hidden_layers: int,
                num_attention_heads: int, num_key_value_heads: int, intermediate_size: int,
                max_position_embeddings: int, block_size: int = DEFAULT_BLOCK_SIZE,
                rope_theta: float = 1000000.0, rms_norm_eps: float = 1e-06,
                tie_word_embeddings: bool = False) -> dict:
    # Same fields as tests/data/sdar-8b-chat/config.json; only sizes and ids differ.
    return {
        "architectures": ["SDARForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig",
                     "AutoModel": "modeling_sdar.SDARModel",
                     "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.0,
        "attn_implementation": "flex_attention",
        "bos_token_id": vocab["<|startoftext|>"], "debug": False,
        "eos_token_id": vocab["<|endoftext|>"], "block_size": block_size,
        "mask_token_id": vocab[MASK_TOKEN], "ep_size": 1, "fuse_cross_entropy": True,
        "head_dim": hidden_size // num_attention_heads, "hidden_act": "silu",
        "hidden_size": hidden_size, "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": num_hidden_layers, "micro_forward": False, "model_type": "sdar",
        "num_attention_heads": num_attention_heads, "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads, "rms_norm_eps": rms_norm_eps,
        "rope_scaling": None, "rope_theta": rope_theta, "skip_checkpoint": False,
        "sliding_window": None, "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": False,
        "use_deepep": False, "use_sliding_window": False,
        "vocab_size": (len(vocab) + 7) // 8 * 8,
    }


def random_state_dict(config: dict, seed: int, logit_scale: float = 4.0) -> dict[str, torch.Tensor]:
    """Random weights whose logits are peaked, so argmax and confidence order have no near-ties."""
    g = torch.Generator().manual_seed(seed)
    d, mlp, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head = config["head_dim"]
    q_rows = config["num_attention_heads"] * head
    kv_rows = config["num_key_value_heads"] * head

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    state = {"model.embed_tokens.weight": randn(vocab, d, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = 1.0 + randn(d, std=0.1)
        state[p + "post_attention_layernorm.weight"] = 1.0 + randn(d, std=0.1)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            state[p + f"self_attn.{name}.weight"] = randn(rows, d, std=2.0 / d**0.5)
        # Gains well away from 1, so a model that skipped the q/k norms would differ.
        state[p + "self_attn.q_norm.weight"] = 1.0 + randn(head, std=0.3)
        state[p + "self_attn.k_norm.weight"] = 1.0 + randn(head, std=0.3)
        state[p + "self_attn.o_proj.weight"] = randn(d, q_rows, std=1.0 / q_rows**0.5)
        state[p + "mlp.gate_proj.weight"] = randn(mlp, d, std=1.0 / d**0.5)
        state[p + "mlp.up_proj.weight"] = randn(mlp, d, std=1.0 / d**0.5)
        state[p + "mlp.down_proj.weight"] = randn(d, mlp, std=1.0 / mlp**0.5)
    state["model.norm.weight"] = torch.ones(d)
    if not config["tie_word_embeddings"]:
        state["lm_head.weight"] = randn(vocab, d, std=logit_scale / d**0.5)
    return state


def write_checkpoint(out: str | Path, state_dict: dict[str, torch.Tensor], config: dict,
                     vocab: dict[str, int], dtype: torch.dtype = torch.float32,
                     dllm_defaults: dict | None = None) -> Path:
    """`tiny_llada.write_checkpoint` with SDAR's generation ids and mask token."""
    # SDAR-8B-Chat's generation_config.json ends on the turn marker or <|endoftext|>.
    generation = {"bos_token_id": vocab["<|startoftext|>"],
                  "eos_token_id": [vocab["<|eot_id|>"], vocab["<|endoftext|>"]],
                  "pad_token_id": vocab["<|endoftext|>"]}
    return tiny_llada.write_checkpoint(out, state_dict, config, vocab, dtype, dllm_defaults,
                                       generation=generation,
                                       special_tokens=SDAR_SPECIAL_TOKENS,
                                       mask_token=MASK_TOKEN)


def write_random_model(out: str | Path, *, seed: int = 0, hidden_size: int = 64,
                       num_hidden_layers: int = 2, num_attention_heads: int = 4,
                       num_key_value_heads: int = 2, intermediate_size: int = 128,
                       max_position_embeddings: int = 1024,
                       block_size: int = DEFAULT_BLOCK_SIZE,
                       tie_word_embeddings: bool = False) -> Path:
    vocab = build_sdar_vocab()
    config = sdar_config(vocab, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads,
                         intermediate_size=intermediate_size,
                         max_position_embeddings=max_position_embeddings,
                         block_size=block_size, tie_word_embeddings=tie_word_embeddings)
    return write_checkpoint(out, random_state_dict(config, seed), config, vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-hidden-layers", type=int, default=2)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--num-key-value-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--max-position-embeddings", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    a = parser.parse_args()
    write_random_model(a.out, seed=a.seed, hidden_size=a.hidden_size,
                       num_hidden_layers=a.num_hidden_layers,
                       num_attention_heads=a.num_attention_heads,
                       num_key_value_heads=a.num_key_value_heads,
                       intermediate_size=a.intermediate_size,
                       max_position_embeddings=a.max_position_embeddings,
                       block_size=a.block_size, tie_word_embeddings=a.tie_word_embeddings)


if __name__ == "__main__":
    main()
