"""Dream's decoding through the engine, on a tiny Dream with a small vocabulary: its
samplers (`alg`) in every cache mode equal the reference `diffusion_generate`, Fast-dLLM's
policies on its confidence equal the reference block decoder with the shift, token
skipping's degenerate settings equal no skipping, and LLaDA's and Dream's parameters are
not mixed; and token skipping (ES-dLLM, DyLLM) equals the reference, shift included: the
reference skipping forwards run on `ReferenceDream` with logits offset 1 (windows one row
earlier, rows scored by the position they predict), in every cache mode, with Dream's
counted samplers (`diffusion_generate`) and with the threshold policy on maskgit_plus's
confidence (the block decoder `generate` with the shift).

One engine on a 6-layer random Dream with a small vocabulary: ES drops rows twice (after
layers 1 and 2 with the default keep schedule) and DyLLM's salient sets shrink over
several layers.
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


CACHES = ("none", "prefix", "dual")
SHAPES = [(16, 8, 8), (32, 8, 16), (32, 16, 8), (16, 16, 8)]  # gen, block, steps
# Unfiltered draws at a moderate temperature: inverse-CDF sampling over a wide vocabulary
# flips a draw when the float32 rounding that separates the two forwards moves a CDF
# boundary past its uniform, which a long flat tail (high temperature) makes likely.
SAMPLERS = [  # (alg, temperature, seed, top_p, top_k, alg_temp)
    ("maskgit_plus", 0.0, None, 1.0, 0, 0.0), ("topk_margin", 0.0, None, 1.0, 0, 0.0),
    ("entropy", 0.0, None, 1.0, 0, 0.0), ("origin", 0.0, 3, 1.0, 0, 0.0),
    ("origin", 0.4, 5, 1.0, 0, 0.0), ("maskgit_plus", 0.7, 7, 0.9, 0, 0.0),
    ("topk_margin", 1.0, 9, 1.0, 20, 0.5), ("entropy", 0.5, 13, 0.95, 50, 0.3),
]
CASES = [
    dict(prompt=small_prompt(i, [1, 6, 19, 40][i % 4]), gen_length=g, block_length=b, steps=s,
         alg=alg, temperature=t, seed=seed, top_p=top_p, top_k=top_k, alg_temp=alg_temp,
         cache=cache)
    for i, ((alg, t, seed, top_p, top_k, alg_temp), cache) in enumerate(
        (sampler, cache) for sampler in SAMPLERS for cache in CACHES)
    for g, b, s in [SHAPES[i % len(SHAPES)]]
]
# Fast-dLLM's rules on maskgit_plus's confidence: at temperature 0 that is the
# probability of the argmax, LLaDA's low_confidence, so the block decoder is the oracle.
POLICY_CASES = [
    dict(prompt=small_prompt(100 + i, 5 + 9 * i), gen_length=32, block_length=8, steps=32,
         policy=policy, cache=cache, temperature=0.0, seed=None, **extra)
    for i, ((policy, extra), cache) in enumerate(
        (p, c) for p in [("threshold", {"threshold": 0.2}), ("frechet", {"frechet_delta": 0.1})]
        for c in CACHES)
]


@pytest.fixture(scope="module")
def small_dream(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("dream-decoding"), seed=4,
                              vocab_size=SMALL_VOCAB, num_hidden_layers=6)


@pytest.fixture(scope="module")
def reference(small_dream):
    return ReferenceDream.from_pretrained(small_dream)


@pytest.fixture(scope="module")
def llm(small_dream):
    engine = dream_engine(small_dream)
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def expected(reference):
    out = []
    for c in CASES:
        settings = {k: v for k, v in c.items() if k != "prompt"}
        settings["top_p"] = settings["top_p"] if settings["top_p"] < 1 else None
        settings["top_k"] = settings["top_k"] or None
        out.append(small_cut(diffusion_generate(reference, c["prompt"], mask_id=SMALL["mask"],
                                           **settings)["tokens"]))
    return out


def test_cases_are_not_trivial(reference, expected):
    """The caches change the reference's tokens on this random model (so the shifted
    windows are exercised), and the samplers decode differently from each other."""
    def plain(case: dict, **change) -> list[int]:
        settings = {**{k: v for k, v in case.items() if k not in ("prompt", "top_p", "top_k")},
                    **change}
        return small_cut(diffusion_generate(reference, case["prompt"], mask_id=SMALL["mask"],
                                       **settings)["tokens"])

    cached = [i for i, c in enumerate(CASES) if c["cache"] != "none" and c["temperature"] == 0]
    assert sum(expected[i] != plain(CASES[i], cache="none") for i in cached) >= len(cached) // 2
    first = CASES[0]
    assert len({tuple(plain(first, alg=a)) for a in ("maskgit_plus", "topk_margin",
                                                      "entropy")}) > 1


def test_samplers_batched(llm, expected):
    got = plugin_tokens(llm, CASES, dream_sampling_params, batched=True)
    assert [(i, CASES[i]["alg"], CASES[i]["cache"]) for i in range(len(CASES))
            if got[i] != expected[i]] == []


def test_samplers_alone(llm, expected):
    cases = CASES[::2]
    got = plugin_tokens(llm, cases, dream_sampling_params, batched=False)
    assert [i for i, c in enumerate(cases) if got[i] != expected[2 * i]] == []


def test_policies_use_the_samplers_confidence(llm, reference):
    want = [small_cut(generate(reference, c["prompt"], mask_id=SMALL["mask"], logits_offset=1,
                          **{k: v for k, v in c.items() if k != "prompt"})["tokens"])
            for c in POLICY_CASES]
    cases = [{**c, "alg": "maskgit_plus"} for c in POLICY_CASES]
    assert plugin_tokens(llm, cases, dream_sampling_params, batched=True) == want


def test_skipping_degenerate_settings_equal_no_skipping(llm):
    """ES keeping every row and DyLLM recomputing every row (querying the prompt each
    iteration) decode what no skipping decodes, in each cache mode."""
    # One case of each sampler family (greedy, origin, sampled with filters) per cache.
    cases = [{**c, "cache": cache} for c in CASES[::9] for cache in CACHES]
    es_all = [{**c, "skip": "es", "es_keep": "1", "es_depth": "0"} for c in cases]
    dyllm_all = [{**c, "skip": "dyllm", "dyllm_threshold": 1.0, "dyllm_full_steps": 0,
                  "dyllm_query_period": 1} for c in cases]
    plain, es_out, dyllm_out = (plugin_tokens(llm, c, dream_sampling_params, batched=True)
                                for c in (cases, es_all, dyllm_all))
    assert es_out == plain
    assert dyllm_out == plain


@pytest.mark.parametrize("extra, parameter", [
    ({"remasking": "random"}, "remasking"), ({"remasking": "low_confidence"}, "remasking"),
    ({"alg": "greedy"}, "alg"), ({"eps": 0}, "eps"), ({"alg_temp": -1}, "alg_temp"),
])
def test_llada_parameters_are_refused(llm, extra, parameter):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=parameter) as e:
        llm.generate([{"prompt_token_ids": [1, 2]}],
                     SamplingParams(max_tokens=8, extra_args=extra), use_tqdm=False)
    assert e.value.parameter == parameter
    # The engine serves on (one short block: what is checked is that it answers).
    served = SamplingParams(max_tokens=8, extra_args={"gen_length": 8, "block_length": 8})
    assert llm.generate([{"prompt_token_ids": [1, 2]}], served,
                        use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("name, value", [("alg", "entropy"), ("alg_temp", 0.5), ("eps", 0.01)])
def test_dream_parameters_are_refused_for_llada(name, value):
    from vllm_dllm.params import ParamError, resolve, server_defaults

    with pytest.raises(ParamError) as e:
        resolve({name: value}, server_defaults(None), max_tokens=None, prompt_len=3,
                max_model_len=512)
    assert e.value.parameter == name and "remasking" in str(e.value)
    dream = resolve({name: value}, server_defaults(None), max_tokens=None, prompt_len=3,
                    max_model_len=512, sampler="dream")
    assert getattr(dream, name) == value


def test_server_defaults_of_the_other_sampler_are_refused():
    from vllm_dllm.params import ParamError, server_defaults

    with pytest.raises(ParamError) as e:
        server_defaults({"alg": "entropy"})
    assert e.value.parameter == "alg"
    with pytest.raises(ParamError) as e:
        server_defaults(None, {"remasking": "random"}, sampler="dream")
    assert e.value.parameter == "remasking"
    assert server_defaults({"alg": "entropy"}, sampler="dream")["alg"] == "entropy"


def test_dream_defaults_to_its_generation_config(llm, reference):
    """No alg given: the folder's generation_config.json (Dream's own) says origin."""
    from vllm import SamplingParams

    prompt = small_prompt(7, 12)
    xargs = {"gen_length": 16, "block_length": 8, "steps": 8}
    got = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0, seed=21, max_tokens=16, extra_args=xargs),
                       use_tqdm=False)[0].outputs[0].token_ids
    want = diffusion_generate(reference, prompt, mask_id=SMALL["mask"], alg="origin", seed=21,
                              **xargs)
    assert list(got) == small_cut(want["tokens"])


def test_context_is_capped_at_the_documented_2048_unless_asked(tmp_path):
    """Dream-7B's config.json allows 131072 positions; unasked, the plugin serves 2048."""
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    shutil.copy(dream_files() / "config.json", tmp_path / "config.json")
    got = [EngineArgs(model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True,
                      max_model_len=given).create_engine_config().model_config.max_model_len
           for given in (None, 4096)]
    assert got == [2048, 4096]


# Token skipping on the same model, against the reference skipping forwards.

ES = {"skip": "es", "es_block_update_freq": 5}
DYLLM = {"skip": "dyllm", "dyllm_threshold": 0.99, "dyllm_full_steps": 2,
         "dyllm_query_period": 3}
# Per method and cache mode: one of Dream's counted samplers at temperature 0 (maskgit_plus
# and entropy in turn), and Fast-dLLM's threshold rule on maskgit_plus's confidence.
COUNTED = [{"alg": "maskgit_plus"}, {"alg": "entropy"}]
THRESHOLD = {"alg": "maskgit_plus", "policy": "threshold", "threshold": 0.2}
SKIP_PARAMS = ("skip", "refresh_period", "es_block_update_freq", "dyllm_threshold",
               "dyllm_full_steps", "dyllm_query_period", "dyllm_attention")


SKIP_CASES = [
    dict(prompt=small_prompt(300 + i, [2, 9, 21][i % 3]), gen_length=16, block_length=8, steps=16,
         temperature=0.0, seed=None, cache=cache, **sampler, **method)
    for i, (method, cache, sampler) in enumerate(
        (m, c, s) for j, (m, c) in enumerate(itertools.product([ES, DYLLM], CACHES))
        for s in (COUNTED[j % 2], THRESHOLD))
]
# The dual cases refresh on ES-dLLM's schedule instead of at block starts.
for case in SKIP_CASES:
    if case["cache"] == "dual":
        case["refresh_period"] = 3
# DyLLM with exact attention for every query row.
SKIP_CASES += [dict(prompt=small_prompt(340 + i, [5, 17][i]), gen_length=16, block_length=8,
                    steps=16, temperature=0.0, seed=None, cache=cache, alg="entropy", **DYLLM,
                    dyllm_attention="exact")
               for i, cache in enumerate(("none", "dual"))]


def skip_reference_tokens(reference: ReferenceDream, case: dict) -> list[int]:
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
def skip_expected(reference):
    return [skip_reference_tokens(reference, c) for c in SKIP_CASES]


def test_skipping_changes_the_decode(llm, skip_expected):
    """The cases are not trivial: most of them decode other tokens than the same settings
    without skipping (decoded by the plugin, which the sampler tests above hold to the
    reference)."""
    plain = plugin_tokens(llm, [{k: v for k, v in c.items() if k not in SKIP_PARAMS}
                                for c in SKIP_CASES], dream_sampling_params, batched=True)
    changed = [a != b for a, b in zip(plain, skip_expected)]
    assert sum(changed) > len(SKIP_CASES) // 2, changed


def test_skipping_batched(llm, skip_expected):
    got = plugin_tokens(llm, SKIP_CASES, dream_sampling_params, batched=True)
    assert [(i, SKIP_CASES[i]["skip"], SKIP_CASES[i]["cache"]) for i in range(len(SKIP_CASES))
            if got[i] != skip_expected[i]] == []


def test_skipping_alone(llm, skip_expected):
    got = plugin_tokens(llm, SKIP_CASES, dream_sampling_params, batched=False)
    assert [(i, SKIP_CASES[i]["skip"], SKIP_CASES[i]["cache"]) for i in range(len(SKIP_CASES))
            if got[i] != skip_expected[i]] == []
