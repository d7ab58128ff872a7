"""Writes small LLaDA2 MoE checkpoints in the original Hugging Face format.

The folder holds what inclusionAI/LLaDA2.0-mini ships: config.json with the real config's
fields (tests/data/llada2-mini/config.json, `model_type: "llada2_moe"`; a few experts in
groups, a shared expert, the first layer dense, sigmoid routing with an expert bias),
generation_config.json, safetensors under the original names
(`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, `...mlp.gate.expert_bias`), and the
character tokenizer of `tiny_llada` plus LLaDA2's turn markers and `<|mask|>`, with a chat
template in LLaDA2's turn format (`<role>HUMAN</role>...<|role_end|><role>ASSISTANT</role>`).

    python -m dllm_reference.tiny_llada2 OUT_DIR [--seed 0]
"""

import argparse
import json
from pathlib import Path

import torch

from dllm_reference import tiny_llada
from dllm_reference.tiny_llada import SPECIAL_TOKENS, build_vocab

MASK_TOKEN = "<|mask|>"
LLADA2_SPECIAL_TOKENS = SPECIAL_TOKENS + ["<role>", "</role>", "<|role_end|>", MASK_TOKEN]
# LLaDA2's turns as its model card and SGLang's/dInfer's examples render them.
CHAT_TEMPLATE = (
    "{% for message in messages %}<role>{{ message['role'] | upper | replace('USER', 'HUMAN') }}"
    "</role>{{ message['content'] }}<|role_end|>{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)
REAL_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "llada2-mini" / "config.json"


def build_llada2_vocab() -> dict[str, int]:
    vocab = build_vocab()
    for token in LLADA2_SPECIAL_TOKENS[len(SPECIAL_TOKENS):]:
        vocab[token] = len(vocab)
    return vocab


def llada2_config(vocab: dict[str, int], *, hidden_size: int = 64, num_hidden_layers: int = 2,
                  num_attention_heads: int = 4, num_key_value_heads: int = 2,
                  intermediate_size: int = 128, moe_intermediate_size: int = 32,
                  num_experts: int = 8, num_experts_per_tok: int = 2, n_group: int = 4,
                  topk_group: int = 2, max_position_embeddings: int = 1024) -> dict:
    """The real config's fields, sizes shrunk and ids those of the tiny vocabulary."""
    config = json.loads(REAL_CONFIG.read_text())
    head_dim = hidden_size // num_attention_heads
    config.update(
        # dFactory's copy renames the type for its merged-expert format; the released
        # folder says llada2_moe.
        model_type="llada2_moe", num_hidden_layers=num_hidden_layers, hidden_size=hidden_size,
        intermediate_size=intermediate_size, moe_intermediate_size=moe_intermediate_size,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        head_dim=head_dim, rotary_dim=head_dim // 2, num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok, n_group=n_group, topk_group=topk_group,
        max_position_embeddings=max_position_embeddings,
        vocab_size=(len(vocab) + 7) // 8 * 8, pad_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], mask_token_id=vocab[MASK_TOKEN])
    return config


def random_state_dict(config: dict, seed: int, logit_scale: float = 4.0
                      ) -> dict[str, torch.Tensor]:
    """Random weights with peaked logits (no near-ties in argmax or confidence order) and
    an expert bias large enough to change which experts a row takes."""
    g = torch.Generator().manual_seed(seed)
    d, vocab = config["hidden_size"], config["vocab_size"]
    head = config["head_dim"]
    qkv_rows = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    def swiglu(prefix: str, width: int) -> None:
        state[prefix + "gate_proj.weight"] = randn(width, d, std=1.0 / d**0.5)
        state[prefix + "up_proj.weight"] = randn(width, d, std=1.0 / d**0.5)
        state[prefix + "down_proj.weight"] = randn(d, width, std=1.0 / width**0.5)

    state = {"model.word_embeddings.weight": randn(vocab, d, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = 1.0 + randn(d, std=0.1)
        state[p + "post_attention_layernorm.weight"] = 1.0 + randn(d, std=0.1)
        state[p + "attention.query_key_value.weight"] = randn(qkv_rows, d, std=2.0 / d**0.5)
        state[p + "attention.query_layernorm.weight"] = 1.0 + randn(head, std=0.3)
        state[p + "attention.key_layernorm.weight"] = 1.0 + randn(head, std=0.3)
        q_width = config["num_attention_heads"] * head
        state[p + "attention.dense.weight"] = randn(d, q_width, std=1.0 / q_width**0.5)
        if i < config["first_k_dense_replace"]:
            swiglu(p + "mlp.", config["intermediate_size"])
            continue
        state[p + "mlp.gate.weight"] = randn(config["num_experts"], d, std=1.0 / d**0.5)
        state[p + "mlp.gate.expert_bias"] = randn(config["num_experts"], std=0.5)
        for e in range(config["num_experts"]):
            swiglu(p + f"mlp.experts.{e}.", config["moe_intermediate_size"])
        swiglu(p + "mlp.shared_experts.",
               config["moe_intermediate_size"] * config["num_shared_experts"])
    state["model.norm.weight"] = torch.ones(d)
    state["lm_head.weight"] = randn(vocab, d, std=logit_scale / d**0.5)
    return state


def write_checkpoint(out: str | Path, state_dict: dict[str, torch.Tensor], config: dict,
                     vocab: dict[str, int], dtype: torch.dtype = torch.float32,
                     dllm_defaults: dict | None = None) -> Path:
    """`tiny_llada.write_checkpoint` with LLaDA2's generation ids, mask and chat template."""
    generation = {"bos_token_id": vocab["<|startoftext|>"],
                  "eos_token_id": vocab["<|endoftext|>"],
                  "pad_token_id": vocab["<|endoftext|>"]}
    return tiny_llada.write_checkpoint(out, state_dict, config, vocab, dtype, dllm_defaults,
                                       generation=generation,
                                       special_tokens=LLADA2_SPECIAL_TOKENS,
                                       mask_token=MASK_TOKEN, chat_template=CHAT_TEMPLATE)


def write_random_model(out: str | Path, *, seed: int = 0, dllm_defaults: dict | None = None,
                       **sizes) -> Path:
    vocab = build_llada2_vocab()
    config = llada2_config(vocab, **sizes)
    return write_checkpoint(out, random_state_dict(config, seed), config, vocab,
                            dllm_defaults=dllm_defaults)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    write_random_model(a.out, seed=a.seed)


if __name__ == "__main__":
    main()
