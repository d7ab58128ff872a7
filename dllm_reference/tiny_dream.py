"""Writes small Dream checkpoints in the original Hugging Face format.

The folder holds what Dream-org/Dream-v0-Instruct-7B ships (config.json with the
same schema and `auto_map`, generation_config.json, safetensors with Qwen2's
`model.layers.*` names, and Dream's own tokenizer files, copied unchanged: the
Qwen2 vocabulary, merges, added tokens and chat template), only with a small
random network. The embedding keeps one row per real token (151,667, padded to a
multiple of 64) so every special id of the tokenizer is a valid row. With a small
`vocab_size` the folder has no tokenizer (serve it with `skip_tokenizer_init`) and the
special ids are the vocabulary's last three (`special_ids`): for decoding tests that
do not need Dream's real tokenizer, where a 151k-wide head and softmax cost the most.

    python -m dllm_reference.tiny_dream OUT_DIR [--seed 0] [--hidden-size 64] ...
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt")
# Real tokens are 0..151666 (`<|mask|>` is the last one).
NUM_TOKENS = 151667


def dream_files() -> Path | None:
    """The folder of Dream's original data files (`shared/models/dream-7b-instruct`)."""
    candidates = [os.environ.get("DLLM_DREAM_FILES")]
    candidates += [str(base / "shared" / "models" / "dream-7b-instruct")
                   for base in (ROOT, ROOT.parent)]
    for c in candidates:
        if c and (Path(c) / "vocab.json").is_file():
            return Path(c)
    return None


def special_ids(vocab_size: int | None = None) -> dict[str, int]:
    """`<|mask|>`, `<|endoftext|>` and `<|im_end|>` of Dream's tokenizer, or of a small
    vocabulary without one (its last three ids)."""
    if vocab_size is None:
        return {"mask": 151666, "eos": 151643, "eot": 151645}
    return {"mask": vocab_size - 1, "eos": vocab_size - 3, "eot": vocab_size - 2}


def dream_config(*, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 num_key_value_heads: int, intermediate_size: int,
                 max_position_embeddings: int, vocab_size: int | None = None) -> dict:
    # Same schema as shared/models/dream-7b-instruct/config.json; only sizes differ.
    ids = special_ids(vocab_size)
    config = {
        "_name_or_path": "tiny-dream", "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                     "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": ids["eos"], "eos_token_id": ids["eos"], "hidden_act": "silu",
        "hidden_size": hidden_size, "initializer_range": 0.02,
        "intermediate_size": intermediate_size, "mask_token_id": ids["mask"],
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": num_hidden_layers, "model_type": "Dream",
        "num_attention_heads": num_attention_heads, "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads, "pad_token_id": ids["eos"],
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2", "use_cache": True, "use_mrope": False,
        "use_sliding_window": False, "vocab_size": (NUM_TOKENS + 63) // 64 * 64,
    }
    if vocab_size is not None:
        # No tokenizer to name `<|im_end|>`: the config says which id ends a turn.
        config.update(vocab_size=vocab_size, eot_token_id=ids["eot"])
    return config


def random_state_dict(config: dict, seed: int, logit_scale: float = 4.0) -> dict[str, torch.Tensor]:
    """Random weights whose logits are peaked, so argmax and confidence order have no near-ties."""
    g = torch.Generator().manual_seed(seed)
    d, mlp, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head = d // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    state = {"model.embed_tokens.weight": randn(vocab, d, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = 1.0 + randn(d, std=0.1)
        state[p + "post_attention_layernorm.weight"] = 1.0 + randn(d, std=0.1)
        for name, rows in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
            state[p + f"self_attn.{name}.weight"] = randn(rows, d, std=2.0 / d**0.5)
            state[p + f"self_attn.{name}.bias"] = randn(rows, std=0.5)
        state[p + "self_attn.o_proj.weight"] = randn(d, d, std=1.0 / d**0.5)
        state[p + "mlp.gate_proj.weight"] = randn(mlp, d, std=1.0 / d**0.5)
        state[p + "mlp.up_proj.weight"] = randn(mlp, d, std=1.0 / d**0.5)
        state[p + "mlp.down_proj.weight"] = randn(d, mlp, std=1.0 / mlp**0.5)
    state["model.norm.weight"] = torch.ones(d)
    state["lm_head.weight"] = randn(vocab, d, std=logit_scale / d**0.5)
    return state


def write_checkpoint(out: str | Path, state_dict: dict[str, torch.Tensor], config: dict,
                     dtype: torch.dtype = torch.float32, dllm_defaults: dict | None = None,
                     files: Path | None = None) -> Path:
    """`dllm_defaults` go into generation_config.json, where the plugin reads a model's
    request defaults; `files` is where Dream's tokenizer files are (`dream_files()`)."""
    files = files or dream_files()
    if files is None:
        raise FileNotFoundError("Dream's tokenizer files (shared/models/dream-7b-instruct) "
                                "not found; set DLLM_DREAM_FILES to their folder")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = json.loads((files / "generation_config.json").read_text())
    if dllm_defaults:
        generation["dllm"] = dllm_defaults
    small = config["vocab_size"] < NUM_TOKENS
    if small:
        generation.update({k: config[k] for k in ("bos_token_id", "eos_token_id",
                                                  "pad_token_id")})
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file({k: v.to(dtype).contiguous() for k, v in state_dict.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in () if small else TOKENIZER_FILES:
        shutil.copyfile(files / name, out / name)
    return out


def write_random_model(out: str | Path, *, seed: int = 0, hidden_size: int = 64,
                       num_hidden_layers: int = 2, num_attention_heads: int = 4,
                       num_key_value_heads: int = 2, intermediate_size: int = 128,
                       max_position_embeddings: int = 1024, vocab_size: int | None = None,
                       dllm_defaults: dict | None = None) -> Path:
    config = dream_config(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                          num_attention_heads=num_attention_heads,
                          num_key_value_heads=num_key_value_heads,
                          intermediate_size=intermediate_size,
                          max_position_embeddings=max_position_embeddings,
                          vocab_size=vocab_size)
    return write_checkpoint(out, random_state_dict(config, seed), config,
                            dllm_defaults=dllm_defaults)


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
    a = parser.parse_args()
    write_random_model(a.out, seed=a.seed, hidden_size=a.hidden_size,
                       num_hidden_layers=a.num_hidden_layers,
                       num_attention_heads=a.num_attention_heads,
                       num_key_value_heads=a.num_key_value_heads,
                       intermediate_size=a.intermediate_size,
                       max_position_embeddings=a.max_position_embeddings)


if __name__ == "__main__":
    main()
