"""Token skipping (ES-dLLM, DyLLM) on Dream through the engine equals the reference, shift
included: the reference skipping forwards run on `ReferenceDream` with logits offset 1
(windows one row earlier, rows scored by the position they predict), in every cache mode,
with Dream's counted samplers (`diffusion_generate`) and with the threshold policy on
maskgit_plus's confidence (the block decoder `generate` with the shift).

A 6-layer random Dream with a small vocabulary, so that ES drops rows twice (after layers 1 and 2 with the
default keep schedule) and DyLLM's salient sets shrink over several layers.
"""

import itertools

import pytest

from dllm_reference.dream import ReferenceDream, diffusion_generate
from dllm_reference.generate import generate
from dllm_reference.tiny_dream import dream_files, write_random_model
from tests.helpers import (SMALL, SMALL_VOCAB, dream_engine, dream_sampling_params,
                           plugin_tokens, shutdown, small_cut, small_prompt)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(dream_files() is None,
                                 reason="Dream's files (shared/models/dream-7b-instruct) missing"),
              pytest.mark.usefixtures("one_thread")]

CACHES = ["none", "prefix", "dual"]
ES = {"skip": "es", "es_block_update_freq": 5}
DYLLM = {"skip": "dyllm", "dyllm_threshold": 0.99, "dyllm_full_steps": 2,
         "dyllm_query_period": 3}
# Per method and cache mode: one of Dream's counted samplers at temperature 0 (maskgit_plus
# and entropy in turn), and Fast-dLLM's threshold rule on maskgit_plus's confidence.
COUNTED = [{"alg": "maskgit_plus"}, {"alg": "entropy"}]
THRESHOLD = {"alg": "maskgit_plus", "policy": "threshold", "threshold": 0.2}
SKIP_PARAMS = ("skip", "refresh_period", "es_block_update_freq", "dyllm_threshold",
               "dyllm_full_steps", "dyllm_query_period")


CASES = [
    dict(prompt=small_prompt(300 + i, [2, 9, 21][i % 3]), gen_length=16, block_length=8, steps=16,
         temperature=0.0, seed=None, cache=cache, **sampler, **method)
    for i, (method, cache, sampler) in enumerate(
        (m, c, s) for j, (m, c) in enumerate(itertools.product([ES, DYLLM], CACHES))
        for s in (COUNTED[j % 2], THRESHOLD))
]
# The dual cases refresh on ES-dLLM's schedule instead of at block starts.
for case in CASES:
    if case["cache"] == "dual":
        case["refresh_period"] = 3


def reference_tokens(reference: ReferenceDream, case: dict) -> list[int]:
    settings = {k: v for k, v in case.items() if k != "prompt"}
    if "policy" in settings:
        # At temperature 0 maskgit_plus's confidence is LLaDA's low_confidence.
        settings.pop("alg")
        out = generate(reference, case["prompt"], mask_id=SMALL["mask"], logits_offset=1,
                       **settings)
    else:
        out = diffusion_generate(reference, case["prompt"], mask_id=SMALL["mask"], **settings)
    return small_cut(out["tokens"])


@pytest.fixture(scope="module")
def deep_dream(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("dream-deep"), seed=4,
                              vocab_size=SMALL_VOCAB, num_hidden_layers=6)


@pytest.fixture(scope="module")
def reference(deep_dream):
    return ReferenceDream.from_pretrained(deep_dream)


@pytest.fixture(scope="module")
def llm(deep_dream):
    engine = dream_engine(deep_dream)
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def expected(reference):
    return [reference_tokens(reference, c) for c in CASES]


def test_skipping_changes_the_decode(llm, expected):
    """The cases are not trivial: most of them decode other tokens than the same settings
    without skipping (decoded by the plugin, which `test_dream_decoding.py` holds to the
    reference there; the reference's full-vocabulary forwards would take minutes)."""
    plain = plugin_tokens(llm, [{k: v for k, v in c.items() if k not in SKIP_PARAMS}
                                for c in CASES], dream_sampling_params, batched=True)
    changed = [a != b for a, b in zip(plain, expected)]
    assert sum(changed) > len(CASES) // 2, changed


def test_batched(llm, expected):
    got = plugin_tokens(llm, CASES, dream_sampling_params, batched=True)
    assert [(i, CASES[i]["skip"], CASES[i]["cache"]) for i in range(len(CASES))
            if got[i] != expected[i]] == []


def test_alone(llm, expected):
    got = plugin_tokens(llm, CASES, dream_sampling_params, batched=False)
    assert [(i, CASES[i]["skip"], CASES[i]["cache"]) for i in range(len(CASES))
            if got[i] != expected[i]] == []
