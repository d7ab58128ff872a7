"""Token skipping (ES-dLLM, DyLLM) through the engine equals the reference, and its
degenerate settings equal no skipping.

A 6-layer random model, so that ES drops rows twice (after layers 1 and 2 with the
default keep schedule) and DyLLM's salient sets shrink over several layers.
"""

import itertools

import pytest

from dllm_reference.generate import generate
from dllm_reference.modeling import ReferenceLLaDA
from dllm_reference.tiny_llada import write_random_model
from tests.helpers import (inproc_engine, model_ids, plugin_tokens, random_prompt,
                           reference_tokens, shutdown)

pytestmark = pytest.mark.slow

CACHES = ["none", "prefix", "dual"]
POLICIES = {"fixed": {}, "threshold": {"threshold": 0.3}}
TEMPERATURES = [(0.0, None), (0.7, 11)]
ES = {"skip": "es", "es_block_update_freq": 5}
DYLLM = {"skip": "dyllm", "dyllm_threshold": 0.99, "dyllm_full_steps": 2,
         "dyllm_query_period": 3}

CASES = [
    dict(prompt=random_prompt(900 + i, [3, 11, 26][i % 3]), gen_length=32, block_length=8,
         steps=32, temperature=t, seed=seed, cache=cache, policy=policy,
         **POLICIES[policy], **method)
    for i, (method, cache, policy, (t, seed)) in enumerate(
        itertools.product([ES, DYLLM], CACHES, POLICIES, TEMPERATURES))
]
# Half the cached cases refresh on ES-dLLM's schedule instead of at block starts.
for case in CASES:
    if case["cache"] != "none" and case["policy"] == "threshold":
        case["refresh_period"] = 3
# DyLLM with exact attention for every query row, once per cache mode.
CASES += [dict(prompt=random_prompt(930 + i, [4, 13, 22][i]), gen_length=32, block_length=8,
               steps=32, temperature=0.0, seed=None, cache=cache, policy="fixed",
               **DYLLM, dyllm_attention="exact")
          for i, cache in enumerate(CACHES)]
PARAMS = ("gen_length", "block_length", "steps", "cache", "refresh_period", "policy",
          "threshold", "skip", "es_block_update_freq", "dyllm_threshold",
          "dyllm_full_steps", "dyllm_query_period", "dyllm_attention")


def sampling_params(case: dict):
    from vllm import SamplingParams

    return SamplingParams(temperature=case["temperature"], seed=case["seed"],
                          max_tokens=case["gen_length"],
                          extra_args={k: case[k] for k in PARAMS if k in case})


def _settings(case: dict) -> dict:
    return {k: v for k, v in case.items() if k != "prompt"}


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("llada-deep"), seed=3, n_layers=6,
                              d_model=64)


@pytest.fixture(scope="module")
def deep_reference(deep_model):
    return ReferenceLLaDA.from_pretrained(deep_model)


@pytest.fixture(scope="module")
def deep_llm(deep_model):
    engine, _ = inproc_engine(deep_model, max_model_len=256, max_num_seqs=32)
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def expected(deep_reference, deep_model):
    return [reference_tokens(deep_reference, deep_model, c["prompt"], **_settings(c))
            for c in CASES]


def test_skipping_changes_the_reference_decode(deep_reference, deep_model, expected):
    """The cases are not trivial: most of them decode other tokens than the same
    settings without skipping."""
    changed = []
    for case, tokens in zip(CASES, expected):
        plain = {**_settings(case), "skip": "none"}
        for name in ("es_block_update_freq", "dyllm_threshold",
                     "dyllm_full_steps", "dyllm_query_period", "dyllm_attention"):
            plain.pop(name, None)
        changed.append(tokens != reference_tokens(deep_reference, deep_model, case["prompt"],
                                                  **plain))
    assert sum(changed) > len(CASES) // 2, changed


def test_dyllm_approximate_attention_changes_the_reference_decode(deep_reference, deep_model,
                                                                 expected):
    """DyLLM's approximate attention is not its exact variant in disguise: most cases
    decode other tokens with exact attention for every row."""
    approximate = [(c, tokens) for c, tokens in zip(CASES, expected)
                   if c["skip"] == "dyllm" and "dyllm_attention" not in c]
    changed = [tokens != reference_tokens(deep_reference, deep_model, c["prompt"],
                                          **{**_settings(c), "dyllm_attention": "exact"})
               for c, tokens in approximate]
    assert sum(changed) > len(approximate) // 2, changed


def test_reference_es_keeps_fewer_rows(deep_reference, deep_model, monkeypatch):
    from dllm_reference import skipping

    kept: list[int] = []
    original = skipping.es_forward

    def spy(*args, **kwargs):
        rows, logits = original(*args, **kwargs)
        kept.append(len(rows) / len(args[2]))
        return rows, logits

    monkeypatch.setattr(skipping, "es_forward", spy)
    case = next(c for c in CASES if c["skip"] == "es" and c["cache"] == "none")
    generate(deep_reference, case["prompt"], mask_id=model_ids(deep_model)["mask"],
             **_settings(case))
    assert min(kept) <= 0.25 and max(kept) == 1.0


def test_batched(deep_llm, expected):
    got = plugin_tokens(deep_llm, CASES, sampling_params, batched=True)
    assert [i for i in range(len(CASES)) if got[i] != expected[i]] == []


def test_alone(deep_llm, expected):
    got = plugin_tokens(deep_llm, CASES, sampling_params, batched=False)
    assert [i for i in range(len(CASES)) if got[i] != expected[i]] == []


@pytest.mark.parametrize("cache,refresh_period",
                         [("none", 0), ("prefix", 0), ("dual", 0), ("dual", 3)])
def test_degenerate_settings_equal_no_skipping(deep_llm, cache, refresh_period):
    cases = [dict(prompt=random_prompt(950 + i, 5 + 7 * i), gen_length=32, block_length=8,
                  steps=32, temperature=t, seed=seed, cache=cache, policy=policy,
                  refresh_period=refresh_period, **POLICIES[policy])
             for i, (policy, (t, seed)) in enumerate(itertools.product(POLICIES, TEMPERATURES))]
    plain = plugin_tokens(deep_llm, cases, sampling_params, batched=True)

    def with_extra(extra: dict):
        def params(case: dict):
            sp = sampling_params(case)
            sp.extra_args.update(extra)
            return sp
        return params

    es_all = plugin_tokens(deep_llm, cases, with_extra({"skip": "es", "es_keep": "1,1,1"}),
                           batched=True)
    dyllm_all = plugin_tokens(deep_llm, cases, with_extra(
        {"skip": "dyllm", "dyllm_threshold": 1.0, "dyllm_full_steps": 0,
         "dyllm_query_period": 1}), batched=True)
    assert es_all == plain
    assert dyllm_all == plain
