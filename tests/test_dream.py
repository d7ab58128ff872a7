"""Dream-7B's architecture: the real checkpoint's shapes, and `vllm serve` of a tiny Dream
folder (original files: config.json, Qwen2 weight names, Dream's tokenizer and chat template)
with no extra flag.

Decoding here is Dream's sampler through the server, checked token for token against the
reference `diffusion_generate` (tests/test_dream_decoding.py covers the samplers, caches
and policies with the offline engine).
"""

import concurrent.futures
import json
import shutil
from pathlib import Path

import pytest
import requests
import torch

from dllm_reference.dream import ReferenceDream, diffusion_generate
from dllm_reference.tiny_dream import dream_files, write_random_model
from tests.helpers import dummy_model_parameters, start_server

MASK, EOS, EOT = 151666, 151643, 151645
# This conversation as Dream's chat template (its tokenizer_config.json) renders it: the
# default system turn first.
CHAT = [{"role": "user", "content": "What is 2+2?"}]
CHAT_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198,
            3838, 374, 220, 17, 10, 17, 30, 151645, 198, 151644, 77091, 198]
XARGS = {"gen_length": 32, "block_length": 8, "steps": 16, "alg": "maskgit_plus"}

pytestmark = [pytest.mark.slow, pytest.mark.skipif(dream_files() is None,
                                reason="Dream's files (shared/models/dream-7b-instruct) missing")]


def test_config_names_the_special_ids():
    from vllm_dllm.configs.dream import DreamConfig

    config = DreamConfig.from_pretrained(str(dream_files()))
    assert (config.mask_token_id, config.eos_token_id, config.eot_token_id) == (MASK, EOS, EOT)
    assert (config.head_dim, config.num_key_value_heads, config.is_causal) == (128, 4, False)


def test_registry_offsets_are_the_models():
    from vllm_dllm.model_executor.registry import ARCHITECTURES, resolve

    for arch in ARCHITECTURES:
        assert resolve(arch.model_cls).dllm_logits_offset == arch.logits_offset, arch


def test_real_size_parameters_match_the_checkpoint_index(tmp_path):
    """Dream-v0-Instruct-7B's config.json builds with load_format=dummy and 1 or 2 layers;
    those layers extrapolate to the checkpoint's parameter count (index total_size, bf16)
    and their parameters are exactly the checkpoint's tensors, fused as vLLM fuses them."""
    shutil.copy(dream_files() / "config.json", tmp_path / "config.json")
    result = dummy_model_parameters(tmp_path, [1, 2])
    assert result[1]["class"] == "DreamModel" and result[1]["offset"] == 1
    one, two = (sum(result[n]["params"].values()) for n in (1, 2))
    per_layer, rest = two - one, 2 * one - two
    index = json.loads((dream_files() / "model.safetensors.index.json").read_text())
    layers = json.loads((dream_files() / "config.json").read_text())["num_hidden_layers"]
    assert (rest + layers * per_layer) * 2 == index["metadata"]["total_size"]

    fused = {"k_proj": "kv_proj", "v_proj": "kv_proj",
             "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}

    def module_name(name: str) -> str:
        for old, new in fused.items():
            name = name.replace(f".{old}.", f".{new}.")
        return name

    kept = [n for n in index["weight_map"]
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < 2]
    assert {module_name(n) for n in kept} == set(result[2]["params"])


@pytest.fixture(scope="module")
def tiny_dream(tmp_path_factory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("dream-tiny"), seed=0)


@pytest.fixture(scope="module")
def reference(tiny_dream):
    return ReferenceDream.from_pretrained(tiny_dream)


@pytest.fixture(scope="module")
def server(tiny_dream, tmp_path_factory):
    proc, base = start_server(tiny_dream, ["--max-model-len", "256", "--max-num-seqs", "8"],
                              tmp_path_factory.mktemp("dream-server") / "server.log")
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def expected(reference, prompt: list[int], **params) -> list[int]:
    tokens = diffusion_generate(reference, prompt, mask_id=MASK, **params)["tokens"]
    for i, t in enumerate(tokens):
        if t in (EOS, EOT):
            return tokens[: i + 1]
    return tokens


def chat(server: str, **body) -> dict:
    r = requests.post(f"{server}/v1/chat/completions", timeout=120, json={
        "model": requests.get(f"{server}/v1/models", timeout=5).json()["data"][0]["id"],
        "messages": CHAT, "max_tokens": 32, "temperature": 0, "return_token_ids": True,
        "vllm_xargs": XARGS, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_uses_dreams_template_and_decodes_with_the_shift(server, reference):
    out = chat(server)
    assert out["prompt_token_ids"] == CHAT_IDS
    choice = out["choices"][0]
    assert choice["token_ids"] == expected(reference, CHAT_IDS, **XARGS)
    from transformers import AutoTokenizer

    from vllm_dllm import register

    register()  # what vLLM does in its processes: Dream's tokenizer without remote code
    tokenizer = AutoTokenizer.from_pretrained(str(dream_files()))
    assert choice["message"]["content"] == tokenizer.decode(choice["token_ids"],
                                                            skip_special_tokens=True)


def test_chat_stream_joins_to_the_full_answer(server):
    full = chat(server)["choices"][0]["message"]["content"]
    r = requests.post(f"{server}/v1/chat/completions", timeout=120, stream=True, json={
        "model": requests.get(f"{server}/v1/models", timeout=5).json()["data"][0]["id"],
        "messages": CHAT, "max_tokens": 32, "temperature": 0, "stream": True,
        "vllm_xargs": XARGS})
    assert r.status_code == 200
    pieces = []
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            pieces.append(delta.get("content") or "")
    assert len(pieces) > 2 and "".join(pieces) == full


def test_cached_modes_and_llada_parameters(server, reference):
    """prefix/dual are served (the windows widen by the shift); LLaDA's remasking is a 400
    naming it, and the server keeps serving."""
    out = chat(server, vllm_xargs={**XARGS, "cache": "dual"})
    assert out["choices"][0]["token_ids"] == expected(reference, CHAT_IDS, **XARGS,
                                                      cache="dual")
    r = requests.post(f"{server}/v1/completions", timeout=60, json={
        "model": requests.get(f"{server}/v1/models", timeout=5).json()["data"][0]["id"],
        "prompt": [1, 2, 3], "max_tokens": 8, "vllm_xargs": {"remasking": "random"}})
    assert r.status_code == 400 and "remasking" in r.json()["error"]["message"]
    assert chat(server)["choices"][0]["token_ids"]


CASES = [  # (prompt length, gen_length, block_length, steps, alg, temperature, seed, top_p, top_k)
    (1, 16, 8, 16, "maskgit_plus", 0.0, None, 1.0, -1), (9, 32, 8, 16, "origin", 0.0, 3, 1.0, -1),
    (23, 32, 32, 8, "entropy", 0.8, 5, 0.9, -1), (40, 16, 4, 8, "topk_margin", 1.0, 9, 1.0, 10),
]


def test_batched_requests_are_token_exact(server, reference):
    """Concurrent completions (batched by the scheduler), greedy and seeded."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, EOS, (n,), generator=g).tolist() for n, *_ in CASES]
    model = requests.get(f"{server}/v1/models", timeout=5).json()["data"][0]["id"]

    def complete(i: int) -> list[int]:
        _, gen, block, steps, alg, temperature, seed, top_p, top_k = CASES[i]
        r = requests.post(f"{server}/v1/completions", timeout=120, json={
            "model": model, "prompt": prompts[i], "max_tokens": gen,
            "temperature": temperature, "seed": seed, "top_p": top_p, "top_k": top_k,
            "return_token_ids": True,
            "vllm_xargs": {"gen_length": gen, "block_length": block, "steps": steps,
                           "alg": alg}})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
        got = list(pool.map(complete, range(len(CASES))))
    for prompt, (_, gen, block, steps, alg, temperature, seed, top_p, top_k), tokens in zip(
            prompts, CASES, got):
        assert tokens == expected(reference, prompt, gen_length=gen, block_length=block,
                                  steps=steps, alg=alg, temperature=temperature, seed=seed,
                                  top_p=top_p if top_p < 1 else None,
                                  top_k=top_k if top_k > 0 else None)
