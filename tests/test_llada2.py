"""LLaDA2.x (`LLaDA2MoeModelLM`): the config and registry entry, the reference MoE model, the
tiny checkpoints against the real config (tests/data/llada2-mini), the real mini and flash
configs built by vLLM with dummy weights, and on the engine: a tiny random LLaDA2 decodes as
the reference block decoder token for token (batched and alone, greedy, seeded, with top_k
and top_p), under tensor parallelism 2 as under 1, through `vllm serve` (chat, stream and
not); what it refuses (LLaDA2.1's token editing, the Fast-dLLM caches) is refused by name."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from dllm_reference import block_diffusion, tiny_llada2
from dllm_reference.llada2 import ReferenceLLaDA2
from tests.helpers import (cut_after_end, dummy_model_parameters, inproc_engine, plugin_tokens,
                           random_prompt, shutdown, start_server)

ROOT = Path(__file__).resolve().parents[1]
REAL = {name: ROOT / "tests" / "data" / f"llada2-{name}" for name in ("mini", "flash")}
BLOCK = 32
# (prompt length, extra_args, temperature, seed): prompts on and off the 32-token grid,
# LLaDA2's threshold rule with and without a steps floor, the fixed schedule, sampling.
CASES = [
    (7, {"gen_length": 40, "policy": "threshold", "threshold": 0.5}, 0.0, 1),
    (32, {"gen_length": 32, "policy": "fixed", "steps": 8}, 0.0, 2),
    (19, {"gen_length": 50, "policy": "threshold", "threshold": 0.6, "steps": 4}, 0.8, 3),
    (45, {"gen_length": 20, "policy": "fixed", "steps": 16}, 0.9, 4),
    (3, {"gen_length": 64, "policy": "factor", "factor": 1.0}, 0.0, 5),
    (12, {"gen_length": 40, "policy": "threshold", "threshold": 0.3}, 1.3, 6,
     {"top_k": 20, "top_p": 0.8}),
]
CPUS = sorted(os.sched_getaffinity(0))
FOLDER_DEFAULTS = {"policy": "threshold", "threshold": 0.6}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Decoding defaults in the folder: LLaDA2's threshold rule, at a threshold the tiny
    # model's predictions clear (LLaDA2's own 0.95 commits the floor of one a step here,
    # the plugin's default schedule).
    folder = tiny_llada2.write_random_model(
        tmp_path_factory.mktemp("llada2-tiny"), seed=0, dllm_defaults=FOLDER_DEFAULTS)
    config = json.loads((folder / "config.json").read_text())
    return folder, ReferenceLLaDA2.from_pretrained(folder), config


def reference(tiny, prompt: list[int], extra: dict, temperature: float, seed: int,
              truncation: dict | None = None, model=None) -> list[int]:
    folder, ref, config = tiny
    settings = {k: v for k, v in extra.items() if k != "gen_length"} | (truncation or {})
    stops = (config["eos_token_id"],)
    tokens = block_diffusion.generate(model or ref, prompt, mask_id=config["mask_token_id"],
                                      gen_length=extra["gen_length"], block_length=BLOCK,
                                      temperature=temperature, seed=seed, stop_ids=stops,
                                      **settings)["tokens"]
    return cut_after_end(tokens, stops)[: extra["gen_length"]]


def cases() -> list[dict]:
    return [{"prompt": random_prompt(300 + i, n), "extra": extra, "temperature": t, "seed": s,
             "truncation": cut[0] if cut else {}}
            for i, (n, extra, t, s, *cut) in enumerate(CASES)]


def params(case: dict) -> SamplingParams:
    return SamplingParams(temperature=case["temperature"], seed=case["seed"],
                          max_tokens=case["extra"]["gen_length"], extra_args=dict(case["extra"]),
                          **case["truncation"])


# -- config, registry, reference, tiny checkpoints (no engine) ------------------------------

def test_config_gives_block_and_ids_without_remote_code():
    from vllm_dllm.configs.llada2 import LLaDA2MoeConfig
    from vllm_dllm.model_executor.registry import BY_ARCHITECTURE

    real = json.loads((REAL["mini"] / "config.json").read_text())
    config = LLaDA2MoeConfig(**{k: v for k, v in real.items() if k != "model_type"})
    assert (config.dllm_block_length, config.mask_token_id, config.eos_token_id) == (
        32, 156895, 156892)
    assert (config.head_dim, config.rotary_dim, config.num_key_value_heads) == (128, 64, 4)
    assert config.rope_parameters["rope_theta"] == 600000
    entry = BY_ARCHITECTURE["LLaDA2MoeModelLM"]
    assert entry.block_causal and entry.model_type == "llada2_moe"


def test_tiny_checkpoint_has_the_real_fields_and_weight_names(tiny):
    folder, _, config = tiny
    real = json.loads((REAL["mini"] / "config.json").read_text())
    # The real fields, plus the ids LLaDA2's `generate` takes as arguments.
    assert set(config) == set(real) | {"eos_token_id", "mask_token_id"}
    names = set(load_file(str(folder / "model.safetensors")))
    moe = {n.replace("model.layers.1.", "") for n in names if n.startswith("model.layers.1.")}
    assert "mlp.gate.expert_bias" in moe and "mlp.shared_experts.down_proj.weight" in moe
    assert {f"mlp.experts.{e}.up_proj.weight" for e in range(config["num_experts"])} <= moe
    dense = {n.replace("model.layers.0.", "") for n in names if n.startswith("model.layers.0.")}
    assert "mlp.gate_proj.weight" in dense and not any("experts" in n for n in dense)
    assert {"attention.query_key_value.weight", "attention.query_layernorm.weight",
            "attention.dense.weight"} <= dense
    assert config["n_group"] > 1 and config["topk_group"] < config["n_group"]
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        add_generation_prompt=True, tokenize=False)
    assert rendered == ("<role>SYSTEM</role>S<|role_end|><role>HUMAN</role>Q<|role_end|>"
                        "<role>ASSISTANT</role>")


@pytest.mark.parametrize("weight", ["mlp.gate.expert_bias", "attention.key_layernorm.weight"])
def test_routing_bias_and_qk_norms_change_the_logits(tiny, weight):
    _, ref, _ = tiny
    model = ReferenceLLaDA2(ref.config, dict(ref.w))
    tokens = torch.arange(3, 40)
    with torch.no_grad():
        before = model(tokens, block_length=BLOCK)
        model.w[f"model.layers.1.{weight}"] = model.w[f"model.layers.1.{weight}"] * 0
        after = model(tokens, block_length=BLOCK)
    assert not torch.allclose(before, after, atol=1e-3)


def test_a_block_sees_itself_and_the_blocks_before_it(tiny):
    _, ref, _ = tiny
    tokens = torch.arange(5, 5 + 3 * BLOCK) % 90 + 1
    later = tokens.clone()
    later[2 * BLOCK:] = 7
    with torch.no_grad():
        base, with_later = ref(tokens, block_length=BLOCK), ref(later, block_length=BLOCK)
        bidirectional = ref(later)
    assert torch.equal(base[: 2 * BLOCK], with_later[: 2 * BLOCK])
    assert not torch.allclose(base[: 2 * BLOCK], bidirectional[: 2 * BLOCK], atol=1e-3)


# -- the real configs, built by vLLM ---------------------------------------------------------

def _parameter_count(config: dict) -> int:
    """LLaDA2's parameters, from its config: embeddings and head, per layer attention (fused
    QKV, q/k norms, output), two norms and a dense SwiGLU or the experts, their router and
    expert bias and the shared experts."""
    d, head, v = config["hidden_size"], config["head_dim"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    attention = (heads + 2 * kv) * head * d + 2 * head + heads * head * d + 2 * d
    experts = config["num_experts"]
    moe = (experts * (d + 1) + 3 * d * config["moe_intermediate_size"]
           * (experts + config["num_shared_experts"]))
    dense = 3 * d * config["intermediate_size"]
    first = config["first_k_dense_replace"]
    layers = config["num_hidden_layers"]
    return 2 * v * d + d + layers * attention + first * dense + (layers - first) * moe


@pytest.mark.slow
@pytest.mark.parametrize("name,billions", [("mini", 16), ("flash", 103)])
def test_real_config_builds_with_dummy_weights(tmp_path, name, billions):
    """dFactory's copy of the real config.json (its model type set back to `llada2_moe`, the
    released folder's) builds with load_format=dummy and 2 or 3 layers; the dense first layer
    and one MoE layer extrapolate to the model's parameter count (16B mini, 100B flash)."""
    real = json.loads((REAL[name] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**real, "model_type": "llada2_moe"}))
    result = dummy_model_parameters(tmp_path, [2, 3])
    assert result[2]["class"] == "LLaDA2MoeModelLM" and result[2]["offset"] == 0
    two, three = (sum(result[n]["params"].values()) for n in (2, 3))
    total = two + (real["num_hidden_layers"] - 2) * (three - two)
    assert total == _parameter_count(real)
    assert round(total / 1e9) == billions
    # vLLM's fused experts: one w13 and one w2 tensor per MoE layer, all experts in them.
    w13 = [n for name, n in result[3]["params"].items()
           if name.startswith("model.layers.2.mlp.experts.") and name.endswith("w13_weight")]
    assert w13 == [real["num_experts"] * 2 * real["moe_intermediate_size"] * real["hidden_size"]]


# -- the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny):
    llm, _ = inproc_engine(tiny[0], max_model_len=256, max_num_seqs=16, block_size=16)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def tp1_tokens(engine) -> list[list[int]]:
    return plugin_tokens(engine, cases(), params, batched=True)


@pytest.mark.slow
def test_plugin_equals_reference_batched(tiny, tp1_tokens):
    want = [reference(tiny, c["prompt"], c["extra"], c["temperature"], c["seed"],
                      c["truncation"])
            for c in cases()]
    assert tp1_tokens == want
    # The answers are not one repeated token, and they tell the model's parts apart: the
    # same decoding without the block mask, the expert bias or the q/k norms differs.
    assert any(len(set(w)) > 3 for w in want)
    _, ref, _ = tiny

    def without(part: str) -> ReferenceLLaDA2:
        return ReferenceLLaDA2(ref.config, {k: v * 0 if part in k else v
                                            for k, v in ref.w.items()})

    def bidirectional(tokens: torch.Tensor, block_length: int) -> torch.Tensor:
        return ref(tokens)

    for model in (bidirectional, without("expert_bias"), without("attention.key_layernorm")):
        assert any(reference(tiny, c["prompt"], c["extra"], c["temperature"], c["seed"],
                             c["truncation"],
                             model=model) != w for c, w in zip(cases(), want))


@pytest.mark.slow
def test_plugin_equals_reference_alone(tiny, engine, tp1_tokens):
    assert plugin_tokens(engine, cases(), params, batched=False) == tp1_tokens


@pytest.mark.slow
@pytest.mark.parametrize("option,extra,parameter", [
    ({"min_p": 0.1}, {}, "min_p"),
    ({}, {"editing_threshold": 0.5}, "editing_threshold"),
    ({}, {"max_post_steps": 16}, "max_post_steps"),
    ({}, {"cache": "dual"}, "cache"),
])
def test_refused_by_name(engine, option, extra, parameter):
    with pytest.raises(VLLMValidationError, match=parameter):
        engine.generate([{"prompt_token_ids": random_prompt(1, 5)}],
                        SamplingParams(temperature=0.5, max_tokens=8, extra_args=extra, **option),
                        use_tqdm=False)


@pytest.mark.slow
@pytest.mark.skipif(len(CPUS) < 2, reason="TP=2 on CPU binds each rank to a core")
def test_tp2_equals_tp1(tiny, tp1_tokens):
    """Each rank holds 2 of the 4 query heads, 1 of the 2 KV heads, half of every expert's
    and the shared expert's width and half of the vocabulary."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(c) for c in CPUS[:2]))
    try:
        llm, _ = inproc_engine(tiny[0], max_model_len=256, max_num_seqs=16, block_size=16,
                               tensor_parallel_size=2)
    finally:
        mp.undo()
    try:
        assert plugin_tokens(llm, cases(), params, batched=True) == tp1_tokens
    finally:
        shutdown(llm)


@pytest.mark.slow
def test_expert_parallel_is_refused_at_start(tiny):
    from vllm import LLM

    with pytest.raises(ValueError, match="do not support expert parallelism"):
        LLM(model=str(tiny[0]), max_model_len=256, enable_expert_parallel=True)


# -- vllm serve ------------------------------------------------------------------------------

@pytest.mark.slow
def test_serve_answers_chat_stream_and_not(tiny, tmp_path):
    """One server on the tiny folder: a chat request decodes the folder's chat template and
    its `dllm` defaults as the reference does, streamed or not (the same tokens, and the
    iterations of the threshold rule, not of the plugin's one-a-step default); min_p and
    token editing get HTTP 400 naming them."""
    import requests
    from openai import OpenAI
    from transformers import AutoTokenizer

    folder, _, config = tiny
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc, base = start_server(folder, ["--max-model-len", "256", "--max-num-seqs", "8"],
                              tmp_path / "server.log", env=env, timeout=480)
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        name = client.models.list().data[0].id
        messages = [{"role": "user", "content": "Count: 1 2 3"}]
        kwargs = dict(model=name, messages=messages, temperature=0, max_tokens=40)
        full = client.chat.completions.create(**kwargs).choices[0].message.content
        pieces = [c.choices[0].delta.content or "" for c in
                  client.chat.completions.create(stream=True, **kwargs) if c.choices]
        assert "".join(pieces) == full
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        assert tokenizer.decode(prompt).endswith("<|role_end|><role>ASSISTANT</role>")
        extra = {"gen_length": 40, **FOLDER_DEFAULTS}
        want = reference(tiny, list(prompt), extra, 0.0, 0)
        assert full == tokenizer.decode(want, skip_special_tokens=True)
        forwards = block_diffusion.generate(
            tiny[1], list(prompt), mask_id=config["mask_token_id"], gen_length=40,
            block_length=BLOCK, stop_ids=(config["eos_token_id"],), **FOLDER_DEFAULTS)["forwards"]
        one_a_step = block_diffusion.generate(
            tiny[1], list(prompt), mask_id=config["mask_token_id"], gen_length=40,
            block_length=BLOCK, stop_ids=(config["eos_token_id"],), policy="fixed")["forwards"]
        assert forwards != one_a_step
        metrics = requests.get(f"{base}/metrics").text.splitlines()
        iterations = [float(line.split()[-1]) for line in metrics
                      if line.startswith("vllm:dllm_request_iterations_sum")]
        assert iterations == [2 * forwards]
        for body, parameter in (({"min_p": 0.5}, "min_p"),
                                ({"vllm_xargs": {"editing_threshold": 0.9}},
                                 "editing_threshold")):
            r = requests.post(f"{base}/v1/chat/completions",
                              json={"model": name, "messages": messages, "max_tokens": 8,
                                    **body})
            assert r.status_code == 400, r.text
            assert parameter in r.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp_path, ignore_errors=True)
