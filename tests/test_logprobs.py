"""Sample logprobs through the engine: each returned token's logprob and top logprobs are
those of the iteration that committed it (log softmax of its position's filtered
logits, tempered when sampling), as the reference decoder records them, in vLLM's own
output format; requests that did not ask get none."""

import math

import pytest

from dllm_reference.generate import generate
from tests.helpers import cut_after_end, model_ids, random_prompt
from vllm_dllm.sampling.token_filters import TokenFilters

pytestmark = pytest.mark.slow

TOP = 3
SETTINGS = [  # (extra_args, temperature, seed, logit_bias)
    ({"gen_length": 32, "block_length": 8, "steps": 16}, 0.0, None, {}),
    ({"gen_length": 32, "block_length": 16, "policy": "threshold", "threshold": 0.3}, 0.0,
     None, {}),
    ({"gen_length": 32, "block_length": 8, "steps": 32}, 0.0, None, {5: 3.0, 7: -2.0}),
    ({"gen_length": 32, "block_length": 16, "policy": "threshold", "threshold": 0.3}, 0.8,
     11, {}),
]


@pytest.fixture(scope="module")
def cases(reference, tiny_model):
    ids = model_ids(tiny_model)
    out = []
    for i, (extra, temperature, seed, bias) in enumerate(SETTINGS):
        prompt = random_prompt(700 + i, 4 + 3 * i)
        filters = TokenFilters(logit_bias=bias) if bias else None
        ref = generate(reference, prompt, mask_id=ids["mask"], temperature=temperature,
                       seed=seed, token_filters=filters, logprobs=TOP,
                       **dict(extra, steps=extra.get("steps", 32)))
        expected = cut_after_end(ref["tokens"], (ids["eos"], ids["eot"]))
        out.append(dict(prompt=prompt, extra=extra, temperature=temperature, seed=seed,
                        bias=bias, expected=expected, records=ref["logprobs"][: len(expected)]))
    return out


def sampling_params(case: dict, logprobs: int | None = TOP):
    from vllm import SamplingParams

    return SamplingParams(temperature=case["temperature"], seed=case["seed"],
                          max_tokens=32, logprobs=logprobs, logit_bias=case["bias"] or None,
                          extra_args=case["extra"])


def test_logprobs_are_the_committing_iterations(llm, cases):
    """Batched with the same requests without logprobs, whose tokens are unchanged."""
    prompts = [{"prompt_token_ids": c["prompt"]} for c in cases]
    params = [sampling_params(c) for c in cases] + [sampling_params(c, None) for c in cases]
    outputs = [o.outputs[0] for o in llm.generate(prompts * 2, params, use_tqdm=False)]
    for case, out, plain in zip(cases, outputs, outputs[len(cases):]):
        assert list(out.token_ids) == case["expected"] == list(plain.token_ids)
        assert plain.logprobs is None
        assert len(out.logprobs) == len(out.token_ids)
        for token, given, (logprob, top) in zip(out.token_ids, out.logprobs, case["records"]):
            assert math.isclose(given[token].logprob, logprob, abs_tol=1e-4)
            ranked = sorted((e.rank, e.logprob, t) for t, e in given.items() if e.rank <= TOP)
            assert [r for r, _, _ in ranked] == list(range(1, TOP + 1))
            values = [v for _, v, _ in ranked]
            assert values == sorted(values, reverse=True)
            assert [t for *_, t in ranked] == [t for t, _ in top]
            assert all(math.isclose(v, w, abs_tol=1e-4) for v, (_, w) in zip(values, top))
            best = [t for t, _ in top]
            if token in best:
                assert given[token].rank == best.index(token) + 1
            else:
                assert given[token].rank > TOP
            if case["temperature"] == 0:
                assert given[token].rank == 1

