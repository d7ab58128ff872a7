"""Fast-dLLM prefix and dual caches in vLLM's pages equal the reference caches, under
Fast-dLLM's refresh at each block start and under ES-dLLM's periodic one."""

import itertools

import pytest

from tests.helpers import plugin_tokens, random_prompt, reference_tokens
from tests.test_token_exact import sampling_params

pytestmark = pytest.mark.slow

SHAPES = [(32, 8, 32), (64, 16, 32), (64, 32, 64), (32, 32, 8)]
CASES = [
    dict(prompt=random_prompt(200 + i, [3, 17, 41, 80][i % 4]), gen_length=g, block_length=b,
         steps=s, remasking="low_confidence", temperature=t, seed=i, cache=cache)
    for i, ((g, b, s), cache, t) in enumerate(
        itertools.product(SHAPES, ["prefix", "dual"], [0.0, 0.6]))
] + [dict(prompt=random_prompt(300, 9), gen_length=32, block_length=8, steps=16,
          remasking="low_confidence", temperature=0.0, seed=None, cache="none")] + [
    # Periods that fall on block starts and between them.
    dict(prompt=random_prompt(400 + i, [5, 23][i % 2]), gen_length=32, block_length=8,
         steps=s, remasking="low_confidence", temperature=t, seed=i, cache=cache,
         refresh_period=period)
    for i, (cache, (s, period), t) in enumerate(
        itertools.product(["prefix", "dual"], [(32, 5), (16, 4)], [0.0, 0.6]))
]


@pytest.fixture(scope="module")
def expected(reference, tiny_model):
    return [reference_tokens(reference, tiny_model, c["prompt"],
                             **{k: v for k, v in c.items() if k != "prompt"}) for c in CASES]


def test_cache_modes_change_the_computation(reference, tiny_model):
    """Sanity: on a random model the approximate caches do not decode like `none`."""
    case = {k: v for k, v in CASES[0].items() if k not in ("prompt", "cache")}
    outs = {mode: reference_tokens(reference, tiny_model, CASES[0]["prompt"], stop_at_end=False,
                                   cache=mode, **case) for mode in ("none", "prefix", "dual")}
    assert outs["none"] != outs["prefix"]
    assert outs["none"] != outs["dual"]
    assert outs["prefix"] != outs["dual"]


def test_refresh_period_changes_the_computation(reference, tiny_model):
    case = {k: v for k, v in CASES[0].items() if k != "prompt"}
    fast, periodic = (reference_tokens(reference, tiny_model, CASES[0]["prompt"],
                                       stop_at_end=False, **{**case, "refresh_period": n})
                      for n in (0, 5))
    assert fast != periodic


def test_batched(llm, expected):
    got = plugin_tokens(llm, CASES, sampling_params, batched=True)
    assert [i for i in range(len(CASES)) if got[i] != expected[i]] == []


def test_alone(llm, expected):
    got = plugin_tokens(llm, CASES, sampling_params, batched=False)
    for case, tokens, want in zip(CASES, got, expected):
        assert tokens == want, case
