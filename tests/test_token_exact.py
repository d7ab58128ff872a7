"""The plugin returns exactly the reference's tokens, batched and alone."""

import itertools

import pytest

from tests.helpers import plugin_tokens, random_prompt, reference_tokens

pytestmark = pytest.mark.slow

SHAPES = [  # (gen_length, block_length, steps)
    (32, 8, 32), (32, 8, 16), (32, 32, 8), (32, 8, 8),
    (64, 8, 64), (64, 32, 32), (64, 64, 16),
    (128, 32, 128), (128, 128, 64), (128, 8, 32),
]
MODES = [("low_confidence", 0.0, None), ("random", 0.0, 7), ("low_confidence", 0.8, 11),
         ("random", 1.0, 5)]
PROMPT_LENGTHS = [1, 7, 23, 50, 100]

CASES = [
    dict(prompt=random_prompt(i, PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]), gen_length=g,
         block_length=b, steps=s, remasking=r, temperature=t, seed=seed)
    for i, ((g, b, s), (r, t, seed)) in enumerate(
        itertools.islice(itertools.product(SHAPES, MODES), 0, None, 1))
]


def sampling_params(case: dict):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=case["temperature"], seed=case["seed"], max_tokens=case["gen_length"],
        extra_args={k: case[k] for k in ("gen_length", "block_length", "steps", "remasking",
                                         "cache", "refresh_period") if k in case})


@pytest.fixture(scope="module")
def expected(reference, tiny_model):
    return [reference_tokens(reference, tiny_model, c["prompt"],
                             **{k: v for k, v in c.items() if k != "prompt"}) for c in CASES]


def test_enough_cases():
    assert len(CASES) >= 20
    assert {len(c["prompt"]) for c in CASES} >= {1, 100}


def test_all_in_one_call(llm, expected):
    got = plugin_tokens(llm, CASES, sampling_params, batched=True)
    mismatches = [(i, CASES[i], got[i], expected[i]) for i in range(len(CASES))
                  if got[i] != expected[i]]
    assert not mismatches


def test_one_request_at_a_time(llm, expected):
    got = plugin_tokens(llm, CASES, sampling_params, batched=False)
    for case, tokens, want in zip(CASES, got, expected):
        assert tokens == want, case
