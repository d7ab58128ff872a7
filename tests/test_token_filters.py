"""vLLM's `logit_bias`, `allowed_token_ids`, `bad_words` and `min_tokens` through the engine
equal the reference decoder with the same filters, greedy and seeded, batched (filtered
and unfiltered requests side by side) and alone; filters the plugin cannot serve are
refused, and the engine serves on."""

import pytest

from dllm_reference.generate import generate
from tests.helpers import cut_after_end, model_ids, plugin_tokens, random_prompt
from vllm_dllm.sampling.token_filters import TokenFilters

pytestmark = pytest.mark.slow

SETTINGS = [  # (extra_args, temperature, seed)
    ({"gen_length": 32, "block_length": 8, "steps": 16}, 0.0, None),
    ({"gen_length": 32, "block_length": 16, "policy": "threshold", "threshold": 0.3}, 0.8, 21),
]
KINDS = ("logit_bias", "allowed_token_ids", "bad_words", "min_tokens", "all")


def spells(tokens: list[int], word: list[int]) -> bool:
    return any(tokens[i : i + len(word)] == word for i in range(len(tokens) - len(word) + 1))


def request_filters(kind: str, plain: list[int], ids: dict, text) -> dict:
    """vLLM sampling parameters of one kind of filter, built from the request's unfiltered
    decode `plain` so that they change it; `text` spells token ids as a string."""
    common = max(set(plain), key=plain.count)
    # The tiny vocabulary's characters other than whitespace: each string is its ids.
    printable = [t for t in plain if 1 <= t <= 94]
    pair = next([a, b] for a, b in zip(printable, printable[1:]))
    kinds = {
        "logit_bias": {"logit_bias": {common: -100.0, plain[-1]: 4.0, ids["eos"]: -3.0}},
        "allowed_token_ids": {"allowed_token_ids": sorted(set(plain) - {common, ids["mask"]})
                              + [ids["eos"]]},
        "bad_words": {"bad_words": [text(pair), text(printable[2:3])],
                      "logit_bias": {pair[1]: 3.0}},
        "min_tokens": {"min_tokens": 12, "logit_bias": {ids["eos"]: 30.0}},
    }
    kinds["all"] = {"min_tokens": 6, "bad_words": [text(pair)],
                    "allowed_token_ids": kinds["allowed_token_ids"]["allowed_token_ids"],
                    "logit_bias": {pair[0]: 2.0, ids["eos"]: 30.0}}
    return kinds[kind]


@pytest.fixture(scope="module")
def cases(llm, reference, tiny_model):
    """Per prompt, an unfiltered request and a filtered one, with what the reference
    decodes for each."""
    from vllm import SamplingParams

    ids = model_ids(tiny_model)
    tokenizer = llm.get_tokenizer()
    out = []
    for i, (kind, (extra, temperature, seed)) in enumerate(
            (k, s) for k in KINDS for s in SETTINGS):
        prompt = random_prompt(900 + i, 3 + 4 * i)
        settings = dict(extra, temperature=temperature, seed=seed if seed is None else seed + i)
        ref = dict(settings, steps=settings.get("steps", 32))
        plain = generate(reference, prompt, mask_id=ids["mask"], **ref)["tokens"]
        given = request_filters(kind, plain, ids, tokenizer.decode)
        words = SamplingParams(bad_words=given.get("bad_words"))
        words.update_from_tokenizer(tokenizer)
        filters = TokenFilters(logit_bias=given.get("logit_bias", {}),
                               allowed_token_ids=given.get("allowed_token_ids", []),
                               bad_words=words.bad_words_token_ids or [],
                               min_tokens=given.get("min_tokens", 0),
                               end_ids=[ids["eos"], ids["eot"]])
        for sampling, token_filters in (({}, None), (given, filters)):
            canvas = generate(reference, prompt, mask_id=ids["mask"],
                              token_filters=token_filters, **ref)["tokens"]
            out.append(dict(prompt=prompt, settings=settings, sampling=sampling, kind=kind,
                            filters=token_filters, canvas=canvas,
                            expected=cut_after_end(canvas, (ids["eos"], ids["eot"]))))
    return out


def sampling_params(case: dict):
    from vllm import SamplingParams

    s = case["settings"]
    return SamplingParams(temperature=s["temperature"], seed=s["seed"],
                          max_tokens=s["gen_length"], **case["sampling"],
                          extra_args={k: v for k, v in s.items()
                                      if k not in ("temperature", "seed")})


def test_filters_change_the_reference_and_hold(cases):
    for plain, case in zip(cases[::2], cases[1::2]):
        f, canvas = case["filters"], case["canvas"]
        assert case["expected"] != plain["expected"], case["kind"]
        if f.allowed_token_ids:
            assert set(canvas) <= set(f.allowed_token_ids)
        assert not any(spells(canvas, w) for w in f.bad_words)
        assert not set(canvas[: f.min_tokens]) & set(f.end_ids)
    # min_tokens holds the end back where the bias alone would end at once.
    for case in cases[1::2]:
        if case["kind"] == "min_tokens":
            assert len(case["expected"]) == case["filters"].min_tokens + 1


def test_batched_with_unfiltered_requests(llm, cases):
    got = plugin_tokens(llm, cases, sampling_params, batched=True)
    assert [c["kind"] for c, g in zip(cases, got) if g != c["expected"]] == []


def test_alone(llm, cases):
    filtered = cases[1::2]
    got = plugin_tokens(llm, filtered, sampling_params, batched=False)
    assert [c["kind"] for c, g in zip(filtered, got) if g != c["expected"]] == []


@pytest.mark.parametrize("given, parameter", [
    ({"min_tokens": 24}, "min_tokens"),
    ({"allowed_token_ids": [99]}, "allowed_token_ids"),
    ({"allowed_token_ids": [5, 6], "bad_words": ["4", "5", "6"]}, "allowed_token_ids"),
    ({"logit_bias": {104: 1.0}}, "logit_bias"),
    ({"allowed_token_ids": [3, 500]}, "allowed_token_ids"),
])
def test_filters_that_cannot_be_served_are_refused(llm, given, parameter):
    """A canvas shorter than min_tokens, filters that leave a position no token (99 is the
    mask, "4" .. "6" are 5 .. 7), ids outside the vocabulary (vLLM's own check)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    extra = {"gen_length": 16, "block_length": 16}
    with pytest.raises(VLLMValidationError, match=parameter):
        llm.generate([{"prompt_token_ids": [1, 2]}],
                     SamplingParams(max_tokens=32, extra_args=extra, **given), use_tqdm=False)
    assert llm.generate([{"prompt_token_ids": [1, 2]}],
                        SamplingParams(max_tokens=16, extra_args=extra),
                        use_tqdm=False)[0].outputs[0].token_ids
