"""Writes small LLaDA checkpoints in the original Hugging Face format.

The folder holds what GSAI-ML/LLaDA-8B-Instruct ships (config.json with the same
schema, generation_config.json, safetensors with `model.transformer.*` names,
tokenizer.json, tokenizer_config.json with LLaDA's chat template), only smaller:
a character-level vocabulary plus LLaDA's special tokens.

    python -m dllm_reference.tiny_llada OUT_DIR [--seed 0] [--d-model 128] ...
"""

import argparse
import json
import string
from pathlib import Path

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# LLaDA-8B-Instruct's chat template, verbatim from its tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

SPECIAL_TOKENS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|mdm_mask|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CHARACTERS = list(string.printable[:95]) + ["\n"]


def build_vocab() -> dict[str, int]:
    vocab = {"<unk>": 0}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    return vocab


def build_tokenizer(vocab: dict[str, int], special_tokens: list[str] = SPECIAL_TOKENS
                    ) -> "Tokenizer":
    # Imported here: a model built in memory (`benchmarks.gpu_check`) needs neither
    # tokenizers nor safetensors.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(special_tokens)
    return tok


def llada_config(vocab: dict[str, int], *, d_model: int, n_layers: int, n_heads: int,
                 mlp_hidden_size: int, max_sequence_length: int) -> dict:
    # Same schema as shared/models/llada-8b-instruct/config.json; only sizes and ids differ.
    vocab_size = (len(vocab) + 7) // 8 * 8
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0,
        "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": d_model, "embedding_dropout": 0.0, "embedding_size": vocab_size,
        "eos_token_id": vocab["<|endoftext|>"], "eot_token_id": vocab["<|eot_id|>"],
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
        "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell",
        "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": vocab["<|mdm_mask|>"],
        "max_sequence_length": max_sequence_length, "mlp_hidden_size": mlp_hidden_size,
        "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": n_heads, "n_kv_heads": n_heads, "n_layers": n_layers,
        "pad_token_id": vocab["<|endoftext|>"], "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True,
        "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
        "transformers_version": "4.46.3", "use_cache": False, "vocab_size": vocab_size,
        "weight_tying": False,
    }


def random_state_dict(config: dict, seed: int, logit_scale: float = 4.0) -> dict[str, torch.Tensor]:
    """Random weights whose logits are peaked, so argmax and confidence order have no near-ties."""
    g = torch.Generator().manual_seed(seed)
    d, mlp, vocab = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    state = {"model.transformer.wte.weight": randn(vocab, d, std=1.0)}
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        state[p + "attn_norm.weight"] = 1.0 + randn(d, std=0.1)
        state[p + "ff_norm.weight"] = 1.0 + randn(d, std=0.1)
        for name in ("q_proj", "k_proj", "v_proj"):
            state[p + f"{name}.weight"] = randn(d, d, std=2.0 / d**0.5)
        state[p + "attn_out.weight"] = randn(d, d, std=1.0 / d**0.5)
        state[p + "ff_proj.weight"] = randn(mlp, d, std=1.0 / d**0.5)
        state[p + "up_proj.weight"] = randn(mlp, d, std=1.0 / d**0.5)
        state[p + "ff_out.weight"] = randn(d, mlp, std=1.0 / mlp**0.5)
    state["model.transformer.ln_f.weight"] = torch.ones(d)
    state["model.transformer.ff_out.weight"] = randn(vocab, d, std=logit_scale / d**0.5)
    return state


def write_tokenizer_files(out: Path, vocab: dict[str, int],
                          special_tokens: list[str] = SPECIAL_TOKENS,
                          mask_token: str | None = None,
                          chat_template: str = CHAT_TEMPLATE) -> None:
    """`mask_token` is named in tokenizer_config.json (SDAR's tokenizer names its mask;
    LLaDA's does not)."""
    build_tokenizer(vocab, special_tokens).save(str(out / "tokenizer.json"))
    added = {
        str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
        for t in special_tokens
    }
    config = {
        "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
        "chat_template": chat_template, "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if mask_token is not None:
        config["mask_token"] = mask_token
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}, indent=2))


def write_checkpoint(out: str | Path, state_dict: dict[str, torch.Tensor], config: dict,
                     vocab: dict[str, int], dtype: torch.dtype = torch.float32,
                     dllm_defaults: dict | None = None, *, generation: dict | None = None,
                     **tokenizer) -> Path:
    """A checkpoint folder: config.json, generation_config.json (`generation`, else
    LLaDA's ids; `dllm_defaults` go into it, where the plugin reads a model's request
    defaults), the weights and the tokenizer files (`tokenizer`: `write_tokenizer_files`'
    options). The other tiny architectures write theirs through it."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = dict(generation or {"bos_token_id": vocab["<|startoftext|>"],
                                     "eos_token_id": vocab["<|endoftext|>"]})
    if dllm_defaults:
        generation["dllm"] = dllm_defaults
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file({k: v.to(dtype).contiguous() for k, v in state_dict.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(out, vocab, **tokenizer)
    return out


def write_random_model(out: str | Path, *, seed: int = 0, d_model: int = 128, n_layers: int = 2,
                       n_heads: int = 2, mlp_hidden_size: int = 256,
                       max_sequence_length: int = 1024) -> Path:
    vocab = build_vocab()
    config = llada_config(vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                          mlp_hidden_size=mlp_hidden_size,
                          max_sequence_length=max_sequence_length)
    return write_checkpoint(out, random_state_dict(config, seed), config, vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=2)
    parser.add_argument("--mlp-hidden-size", type=int, default=256)
    parser.add_argument("--max-sequence-length", type=int, default=1024)
    a = parser.parse_args()
    write_random_model(a.out, seed=a.seed, d_model=a.d_model, n_layers=a.n_layers,
                       n_heads=a.n_heads, mlp_hidden_size=a.mlp_hidden_size,
                       max_sequence_length=a.max_sequence_length)


if __name__ == "__main__":
    main()
