"""Shared pieces of the integration tests."""

import json
from pathlib import Path

import torch

from tests.reference.generate import generate


def model_ids(model_dir: Path) -> dict:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {"mask": config["mask_token_id"], "eos": config["eos_token_id"],
            "eot": config["eot_token_id"]}


def random_prompt(seed: int, length: int, vocab: int = 96) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (length,), generator=g).tolist()


def reference_tokens(reference, model_dir: Path, prompt: list[int], *, stop_at_end: bool = True,
                     **params) -> list[int]:
    """What the plugin must return: the reference canvas, cut after the first end token."""
    ids = model_ids(model_dir)
    tokens = generate(reference, prompt, mask_id=ids["mask"], **params)["tokens"]
    if stop_at_end:
        for i, t in enumerate(tokens):
            if t in (ids["eos"], ids["eot"]):
                return tokens[: i + 1]
    return tokens
