"""Block diffusion on the real engine: a tiny random SDAR decodes as the reference block
decoder (`dllm_reference/block_diffusion.py`) token for token, batched and alone, greedy,
seeded and with top_k / top_p, when joining a running batch and after preemption; whole prompt blocks come
from vLLM's prefix cache; what block-causal models refuse is refused by name."""

import json

import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from dllm_reference import block_diffusion
from dllm_reference.sdar import ReferenceSDAR
from dllm_reference.tiny_sdar import write_random_model
from vllm_dllm.config import dllm_defaults
from tests.helpers import (cut_after_end, inproc_engine, plugin_tokens, random_prompt,
                           run_to_completion, shutdown, start_server)

pytestmark = pytest.mark.slow

BLOCK = 4
# (prompt length, extra_args, temperature, seed, top_k / top_p): prompts on and off the block
# grid, every policy, steps that split the block unevenly, sampling, truncated sampling.
CASES = [
    (7, {"gen_length": 13, "policy": "threshold", "threshold": 0.5}, 0.0, 1, {}),
    (8, {"gen_length": 16, "policy": "fixed", "steps": 2}, 0.0, 2, {}),
    (5, {"gen_length": 20, "policy": "threshold", "threshold": 0.6, "steps": 3}, 0.8, 3, {}),
    (13, {"gen_length": 9, "policy": "fixed"}, 0.9, 4, {}),
    (3, {"gen_length": 30, "policy": "factor", "factor": 1.0}, 0.0, 5, {}),
    (10, {"gen_length": 24, "policy": "frechet"}, 0.7, 6, {}),
    (6, {"gen_length": 20, "policy": "threshold", "threshold": 0.3}, 1.5, 7,
     {"top_k": 4, "top_p": 0.7}),
    (9, {"gen_length": 16, "policy": "fixed"}, 1.2, 8, {"top_p": 0.5}),
    (11, {"gen_length": 18, "policy": "sequential", "steps": 2}, 0.0, 9, {}),
    (6, {"gen_length": 15, "policy": "sequential", "steps": 3}, 0.9, 10, {}),
]


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    folder = write_random_model(tmp_path_factory.mktemp("sdar-tiny"), seed=0, block_size=BLOCK)
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    return folder, ReferenceSDAR.from_pretrained(folder), config["mask_token_id"], \
        tuple(generation["eos_token_id"])


@pytest.fixture(scope="module")
def engine(sdar):
    # Pages of 16 so that a 64-token system prompt fills whole pages vLLM can share.
    llm, recorder = inproc_engine(sdar[0], max_model_len=256, max_num_seqs=40, block_size=16,
                                  disable_log_stats=False)
    yield llm, recorder
    shutdown(llm)


def reference(sdar, prompt: list[int], extra: dict, temperature: float, seed: int,
              truncation: dict | None = None, bidirectional: bool = False,
              ignore_eos: bool = False) -> list[int]:
    _, model, mask, ends = sdar
    settings = {k: v for k, v in extra.items() if k != "gen_length"} | (truncation or {})
    if bidirectional:
        model = _Bidirectional(model)
    stops = () if ignore_eos else ends
    tokens = block_diffusion.generate(model, prompt, mask_id=mask, gen_length=extra["gen_length"],
                                      block_length=BLOCK, temperature=temperature, seed=seed,
                                      stop_ids=stops, **settings)["tokens"]
    return cut_after_end(tokens, stops)[: extra["gen_length"]]


class _Bidirectional:
    """The reference model with its block mask taken off."""

    def __init__(self, model):
        self.model = model

    def __call__(self, tokens: torch.Tensor, block_length: int) -> torch.Tensor:
        return self.model(tokens)


def params(extra: dict, temperature: float, seed: int, truncation: dict | None = None,
           ignore_eos: bool = False) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=extra["gen_length"],
                          ignore_eos=ignore_eos, extra_args=dict(extra), **(truncation or {}))


def cases() -> list[dict]:
    return [{"prompt": random_prompt(i, n), "args": (extra, t, s, cut)}
            for i, (n, extra, t, s, cut) in enumerate(CASES)]


@pytest.mark.parametrize("batched", [True, False])
def test_plugin_equals_reference(sdar, engine, batched):
    llm, recorder = engine
    want = [reference(sdar, c["prompt"], *c["args"]) for c in cases()]
    got = plugin_tokens(llm, cases(), lambda c: params(*c["args"]), batched=batched)
    assert got == want
    # The attention really is block-causal: the same decoding without the block mask differs.
    assert any(reference(sdar, c["prompt"], *c["args"], bidirectional=True) != w
               for c, w in zip(cases(), want))
    # Truncation changes what is drawn.
    assert any(reference(sdar, c["prompt"], *c["args"][:3]) != w
               for c, w in zip(cases(), want) if c["args"][3])
    assert recorder.mischarged() == []


def test_request_joining_mid_batch_decodes_the_same(sdar, engine):
    llm, _ = engine
    arrivals = {}
    for i, c in enumerate(cases()):
        arrivals.setdefault(3 * i, []).append(
            (f"r{i}", c["prompt"], params(*c["args"])))
    done = run_to_completion(llm, arrivals)
    for i, c in enumerate(cases()):
        rid = next(r for r in done if r.startswith(f"r{i}"))
        assert done[rid] == reference(sdar, c["prompt"], *c["args"]), i


def test_shared_system_prompt_is_computed_once(sdar, engine):
    """32 requests behind one 64-token system prompt: its four pages are computed by the
    first request only (the rows each request's first iteration computes say so, and so
    do vLLM's own prefix-cache counters), and every answer is the reference's."""
    llm, recorder = engine
    system = random_prompt(100, 64)
    batch = [{"prompt": system + random_prompt(200 + i, 1 + i % 7),
              "extra": {"gen_length": 12, "policy": "threshold", "threshold": 0.5}}
             for i in range(32)]
    hits_before = _counter(llm, "vllm:prefix_cache_hits")
    first = len(recorder.charges)
    got = plugin_tokens(llm, batch, lambda c: params(c["extra"], 0.0, 0), batched=True)
    assert got == [reference(sdar, c["prompt"], c["extra"], 0.0, 0) for c in batch]
    computed = {}
    for step in recorder.charges[first:]:
        for rid, (_, rows) in step.items():
            computed.setdefault(rid, rows)
    # A request's first iteration computes its prompt blocks and its first block.
    full = [len(c["prompt"]) // BLOCK * BLOCK + BLOCK for c in batch]
    # `generate` numbers its requests in order.
    rows = [computed[rid] for rid in sorted(computed, key=int)]
    assert [f - r for f, r in zip(full, rows)] == [0] + [64] * 31
    assert _counter(llm, "vllm:prefix_cache_hits") - hits_before == 31 * 64


def _counter(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def test_architecture_defaults_apply(sdar, engine):
    """With no decoding parameter and no `dllm` entry in the folder, SDAR decodes with its
    own generate's default, the threshold rule at 0.85: its tokens and its iterations."""
    llm, recorder = engine
    _, model, mask, _ = sdar
    # 10 + 14 positions: whole blocks, so the request ends with its last iteration.
    prompt = random_prompt(41, 10)
    first = len(recorder.steps)
    got = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
                       use_tqdm=False)
    want = block_diffusion.generate(model, prompt, mask_id=mask, gen_length=14,
                                    block_length=BLOCK, policy="threshold", threshold=0.85)
    assert list(got[0].outputs[0].token_ids) == want["tokens"]
    assert sum(bool(step["scheduled"]) for step in recorder.steps[first:]) == want["forwards"]
    defaults = dllm_defaults(llm.llm_engine.vllm_config)
    assert (defaults["policy"], defaults["threshold"]) == ("threshold", 0.85)


@pytest.mark.parametrize("extra,parameter", [
    ({"cache": "dual"}, "cache"),
    ({"skip": "es"}, "skip"),
    ({"r2": True}, "r2"),
    ({"block_length": 8}, "block_length"),
    ({"refresh_period": 4}, "refresh_period"),
])
def test_refused_by_name(engine, extra, parameter):
    llm, _ = engine
    with pytest.raises(VLLMValidationError, match=parameter):
        llm.generate([{"prompt_token_ids": random_prompt(1, 5)}],
                     SamplingParams(max_tokens=8, extra_args=extra), use_tqdm=False)
    ok = llm.generate([{"prompt_token_ids": random_prompt(1, 5)}],
                      SamplingParams(max_tokens=8), use_tqdm=False)
    assert ok[0].outputs[0].token_ids


def test_preempted_request_resumes_with_same_tokens(sdar):
    """KV room for one sequence: a high-priority arrival preempts the running one, which
    recomputes its finished blocks when it resumes."""
    mp = pytest.MonkeyPatch()
    mp.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    # 2 layers x (K, V) x 2 heads x 16 dims x fp32 = 512 B per token: one page of 128
    # tokens for requests, plus the null page vLLM keeps back.
    try:
        llm, recorder = inproc_engine(sdar[0], max_model_len=128, block_size=128,
                                      kv_cache_memory_bytes=2 * 128 * 512,
                                      scheduling_policy="priority")
    finally:
        mp.undo()
    low = (random_prompt(7, 30), {"gen_length": 60, "policy": "fixed"}, 0.7, 9)
    high = (random_prompt(8, 21), {"gen_length": 30, "policy": "threshold"}, 0.0, 0)
    done = run_to_completion(llm, {
        0: [("low", low[0], params(*low[1:], ignore_eos=True), 1)],
        10: [("high", high[0], params(*high[1:], ignore_eos=True), 0)],
    })
    assert any("low" in s["preempted"] for s in recorder.steps)
    assert recorder.mischarged() == []
    for rid, (prompt, extra, t, seed) in (("low", low), ("high", high)):
        assert done[rid] == reference(sdar, prompt, extra, t, seed, ignore_eos=True), rid
    shutdown(llm)


def test_vllm_serve_answers_chat(sdar, tmp_path):
    """`vllm serve <SDAR folder>` with no plugin flag: chat with its template, stream and
    not alike, and a block-causal refusal is an HTTP 400 naming the parameter."""
    import requests
    from openai import OpenAI

    proc, base = start_server(sdar[0], ["--max-model-len", "256", "--block-size", "16"],
                              tmp_path / "server.log")
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        model = client.models.list().data[0].id
        kwargs = dict(model=model, messages=[{"role": "user", "content": "What is 2+2?"}],
                      max_tokens=24, temperature=0,
                      extra_body={"ignore_eos": True, "vllm_xargs": {"policy": "threshold"}})
        full = client.chat.completions.create(**kwargs)
        pieces = [c.choices[0].delta.content or "" for c in
                  client.chat.completions.create(stream=True, **kwargs) if c.choices]
        assert full.usage.completion_tokens == 24
        assert len([p for p in pieces if p]) > 1
        assert "".join(pieces) == full.choices[0].message.content
        bad = requests.post(f"{base}/v1/chat/completions", json={
            **{k: v for k, v in kwargs.items() if k != "extra_body"},
            "vllm_xargs": {"cache": "dual"}}, timeout=60)
        assert bad.status_code == 400 and "cache" in bad.text
    finally:
        proc.terminate()
        proc.wait(30)
