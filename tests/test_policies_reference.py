"""Parallel policies (threshold, factor, Fréchet) in the plugin equal the reference, with
every cache mode, greedy and seeded, batched and alone."""

import itertools

import pytest

from dllm_reference.generate import commit_count, generate
from tests.helpers import model_ids, plugin_tokens, random_prompt, reference_tokens

pytestmark = pytest.mark.slow

# Chosen on the tiny random model (its confidences are mostly 0.2-0.95) so that most
# iterations commit several tokens and yet most blocks take several iterations, which
# the cache modes need to differ from a full recompute.
POLICIES = {"threshold": {"threshold": 0.3}, "factor": {"factor": 4.0},
            "frechet": {"frechet_delta": 0.01}}
SHAPES = [(32, 8), (64, 32), (48, 16)]  # (gen_length, block_length)
CACHES = ["none", "prefix", "dual"]
TEMPERATURES = [(0.0, None), (0.7, 13)]

# Random remasking draws its order from the seed, so those cases always carry one.
CASES = [
    dict(prompt=random_prompt(700 + i, [2, 9, 30, 61][i % 4]), gen_length=g, block_length=b,
         remasking=remasking, temperature=t, seed=seed if remasking == "low_confidence" else 29,
         cache=cache, policy=policy, **POLICIES[policy])
    for i, (policy, cache, (t, seed)) in enumerate(
        itertools.product(POLICIES, CACHES, TEMPERATURES))
    for (g, b), remasking in [(SHAPES[i % 3], "random" if i % 5 == 4 else "low_confidence")]
]
EXTRA_KEYS = ("gen_length", "block_length", "remasking", "cache", "policy", "threshold",
              "factor", "frechet_delta")


def sampling_params(case: dict):
    from vllm import SamplingParams

    return SamplingParams(temperature=case["temperature"], seed=case["seed"],
                          max_tokens=case["gen_length"],
                          extra_args={k: case[k] for k in EXTRA_KEYS if k in case})


def _settings(case: dict) -> dict:
    return {k: v for k, v in case.items() if k != "prompt"}


@pytest.fixture(scope="module")
def expected(reference, tiny_model):
    return [reference_tokens(reference, tiny_model, c["prompt"], **_settings(c)) for c in CASES]


def test_cases_cover_the_grid():
    assert {(c["policy"], c["cache"], c["temperature"]) for c in CASES} == set(
        itertools.product(POLICIES, CACHES, [t for t, _ in TEMPERATURES]))
    assert {c["remasking"] for c in CASES} == {"low_confidence", "random"}
    for policy in POLICIES:
        assert {(c["gen_length"], c["block_length"]) for c in CASES
                if c["policy"] == policy} == set(SHAPES)


def test_commit_counts_by_hand():
    # threshold: all >= tau, at least the top one.
    assert commit_count("threshold", [0.95, 0.9, 0.5], threshold=0.9) == 2
    assert commit_count("threshold", [0.5, 0.4], threshold=0.9) == 1
    # factor 1: c(2) = 0.7 >= 2/3 passes, c(3) = 0.7 < 3/4 fails; the failing last
    # candidate is not committed (Fast-dLLM v1's quirk would commit it).
    assert commit_count("factor", [0.9, 0.7, 0.7], factor=1.0) == 2
    assert commit_count("factor", [0.9, 0.8, 0.5], factor=2.0) == 3  # 0.5 >= 1 - 2/4
    assert commit_count("factor", [0.9, 0.1], factor=1.0) == 1
    # frechet: G_1 = 0.8, G_2 = 0.9 + 0.9 - 1 - 0.1 = 0.7, G_3 = 2.4 - 2 - 0.4 = 0.
    assert commit_count("frechet", [0.9, 0.9, 0.6], frechet_delta=0.25) == 2
    assert commit_count("frechet", [0.5, 0.5], frechet_delta=0.25) == 1
    assert commit_count("fixed", [0.1, 0.2], count=5) == 2


def test_reference_decodes_in_parallel_and_caches_matter(reference, tiny_model):
    """The cases are not trivial: in every case the reference needs fewer forwards than
    tokens, more than one forward in some block (so the cache modes' partial forwards
    run) and commits several tokens in some iteration; threshold and factor commit
    several tokens in most iterations. Fréchet cannot on this model: committing two
    tokens needs c(1) + 2 c(2) > 2 + delta, and its second-best confidences after the
    first iteration of a block are mostly below 0.6, whatever delta > 0."""
    mask = model_ids(tiny_model)["mask"]
    multi: dict[str, list[bool]] = {p: [] for p in POLICIES}
    for case in CASES:
        out = generate(reference, case["prompt"], mask_id=mask, **_settings(case))
        assert mask not in out["tokens"]
        assert sum(out["commits"]) == case["gen_length"]
        num_blocks = case["gen_length"] // case["block_length"]
        assert num_blocks < out["forwards"] < case["gen_length"], case
        assert max(out["commits"]) > 1, case
        multi[case["policy"]] += [n > 1 for n in out["commits"]]
    share = {p: sum(m) / len(m) for p, m in multi.items()}
    assert share["threshold"] > 0.5 and share["factor"] > 0.5, share
    assert share["frechet"] > 0.15, share


def test_batched(llm, expected):
    got = plugin_tokens(llm, CASES, sampling_params, batched=True)
    assert [i for i in range(len(CASES)) if got[i] != expected[i]] == []


def test_alone(llm, expected):
    got = plugin_tokens(llm, CASES, sampling_params, batched=False)
    assert [i for i in range(len(CASES)) if got[i] != expected[i]] == []
