"""Continuous batching, early stop and preemption on the real vLLM engine, stepped by hand."""

import pytest

from tests.helpers import (
    inproc_engine,
    model_ids,
    random_prompt,
    reference_tokens,
    run_to_completion,
    shutdown,
)

pytestmark = pytest.mark.slow


def make_params(gen_length, block_length, steps, temperature=0.0, seed=None, ignore_eos=False,
                **extra):
    from vllm import SamplingParams

    return SamplingParams(temperature=temperature, seed=seed, max_tokens=gen_length,
                          ignore_eos=ignore_eos,
                          extra_args=dict(gen_length=gen_length, block_length=block_length,
                                          steps=steps, **extra))


SPECS = {
    "a": (random_prompt(1, 12), dict(gen_length=32, block_length=8, steps=32)),
    "b": (random_prompt(2, 40), dict(gen_length=64, block_length=32, steps=32,
                                     temperature=0.9, seed=3)),
    "c": (random_prompt(3, 5), dict(gen_length=32, block_length=16, steps=16,
                                    remasking="random", seed=4)),
}


def test_the_scheduler_charges_exactly_the_rows_each_iteration_computes(inproc):
    """Every cache mode x skip mode x refresh schedule, batched: each iteration's charge
    (the token budget, vLLM's scheduled-token counts) equals the rows the runner lays out
    for that request, and the recomputed-rows metric counts the same rows."""
    llm, recorder = inproc
    charges_before = len(recorder.charges)
    arrivals = []
    for i, (cache, skip, period) in enumerate(
            (c, s, p) for c in ("none", "prefix", "dual") for s in ("none", "es", "dyllm")
            for p in ((0,) if c == "none" else (0, 3))):
        extra = dict(cache=cache, skip=skip, refresh_period=period)
        if skip == "es":
            extra["es_block_update_freq"] = 3
        if skip == "dyllm":
            extra.update(dyllm_full_steps=1, dyllm_query_period=3)
        arrivals.append((f"charge-{i}", random_prompt(70 + i, 5 + i),
                         make_params(32, 8, 32, ignore_eos=True, **extra)))
    run_to_completion(llm, {0: arrivals[::2], 3: arrivals[1::2]})
    charges = recorder.charges[charges_before:]
    computed = {rows for step in charges for _, rows in step.values()}
    assert len(computed) > 5, computed  # the cases exercise windows of many widths
    assert [m for m in recorder.mischarged() if m[0] >= charges_before] == []


def test_requests_join_mid_generation(inproc, reference, tiny_model):
    llm, recorder = inproc
    recorder.steps.clear()
    done = run_to_completion(llm, {
        0: [("a", SPECS["a"][0], make_params(**SPECS["a"][1]))],
        9: [("b", SPECS["b"][0], make_params(**SPECS["b"][1]))],
        13: [("c", SPECS["c"][0], make_params(**SPECS["c"][1]))],
    })
    for rid, (prompt, p) in SPECS.items():
        assert done[rid] == reference_tokens(reference, tiny_model, prompt, **p), rid

    # One iteration held "a" past its first block while "b" took its first step.
    assert any({"a", "b"} <= set(s["scheduled"])
               and s["scheduled"]["a"] >= 8 and s["scheduled"]["b"] == 0
               for s in recorder.steps)


def _prompt_ending_in_first_block(reference, tiny_model) -> list[int]:
    ids = model_ids(tiny_model)
    for seed in range(200):
        prompt = random_prompt(100 + seed, 10)
        tokens = reference_tokens(reference, tiny_model, prompt, stop_at_end=False,
                                  gen_length=32, block_length=8, steps=32)
        if any(t in (ids["eos"], ids["eot"]) for t in tokens[:8]):
            return prompt
    raise AssertionError("no prompt of the random model ends in its first block")


def test_early_stop_runs_no_later_block(inproc, reference, tiny_model):
    llm, recorder = inproc
    prompt = _prompt_ending_in_first_block(reference, tiny_model)
    recorder.steps.clear()
    done = run_to_completion(llm, {0: [
        ("stop", prompt, make_params(32, 8, 32)),
        ("full", prompt, make_params(32, 8, 32, ignore_eos=True)),
    ]})
    want = reference_tokens(reference, tiny_model, prompt, gen_length=32, block_length=8,
                            steps=32)
    assert done["stop"] == want and len(want) <= 8
    # Block 1 of 4 takes 8 iterations; blocks 2-4 would take 24 more.
    assert recorder.iterations("stop") <= 8
    assert recorder.iterations("full") == 32
    assert len(done["full"]) == 32


def test_preempted_request_resumes_with_same_tokens(tiny_model, reference):
    """KV room for one sequence: a high-priority arrival preempts the running one."""
    mp = pytest.MonkeyPatch()
    mp.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    # 2 layers x (K, V) x 2 heads x 64 dims x fp32 = 2 KiB per token: one page of
    # 128 tokens for requests, plus the null page vLLM keeps back.
    try:
        llm, recorder = inproc_engine(tiny_model, max_model_len=128, block_size=128,
                                      kv_cache_memory_bytes=2 * 128 * 2048,
                                      scheduling_policy="priority")
    finally:
        mp.undo()
    low = (random_prompt(7, 30), dict(gen_length=64, block_length=16, steps=32,
                                      temperature=0.7, seed=9, ignore_eos=True))
    high = (random_prompt(8, 20), dict(gen_length=32, block_length=8, steps=16,
                                       ignore_eos=True))
    done = run_to_completion(llm, {
        0: [("low", low[0], make_params(**low[1]), 1)],
        10: [("high", high[0], make_params(**high[1]), 0)],
    })
    assert any("low" in s["preempted"] for s in recorder.steps)
    assert recorder.charges and recorder.mischarged() == []
    for rid, (prompt, p) in (("low", low), ("high", high)):
        p = {k: v for k, v in p.items() if k != "ignore_eos"}
        assert done[rid] == reference_tokens(reference, tiny_model, prompt,
                                             stop_at_end=False, **p), rid
    shutdown(llm)


def test_warm_up_scores_as_many_logits_rows_as_an_iteration_can(inproc):
    """The sampler warm-up vLLM's GPU worker profiles runs the decoding core on logits
    for every row the token budget allows, on a batch of its own: the runner's rows
    and requests stay as they were."""
    import torch

    from vllm_dllm.engine.model_runner import WARM_UP_BLOCK

    llm, _ = inproc
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    budget = runner.scheduler_config.max_num_batched_tokens
    free, tokens = list(runner.batch._free), runner.batch.tokens.clone()
    hidden = torch.zeros(3, runner.model_config.get_hidden_size())
    logits = runner._dummy_sampler_run(hidden)
    assert budget <= logits.shape[0] < budget + WARM_UP_BLOCK
    assert logits.shape[0] % WARM_UP_BLOCK == 0
    assert logits.shape[1] == runner.model_config.get_vocab_size()
    assert runner.batch._free == free and torch.equal(runner.batch.tokens, tokens)
