"""vLLM's token filters (`logit_bias`, `allowed_token_ids`, `bad_words`, `min_tokens`) in
the decoding core, driven by the reference models (no engine): batched with unfiltered
requests they decode what the reference decoders do with the same filters, on LLaDA's
policies and Dream's samplers, greedy and sampled; and tokens committed together never
spell a bad word."""

import pytest
import torch

from dllm_reference.dream import ReferenceDream, diffusion_generate
from dllm_reference.generate import generate
from dllm_reference.tiny_dream import dream_files, write_random_model
from dllm_reference.core_driver import CoreDriver
from tests.helpers import SMALL, SMALL_VOCAB, model_ids, random_prompt, small_prompt
from vllm_dllm.params import DllmParams
from vllm_dllm.sampling.batch import DenoiseBatch, SpecialTokens
from vllm_dllm.sampling.token_filters import TokenFilters


def spells(tokens: list[int], word: list[int]) -> bool:
    return any(tokens[i : i + len(word)] == word for i in range(len(tokens) - len(word) + 1))


def filter_sets(plain: list[list[int]], ends: list[int]) -> list[TokenFilters | None]:
    """No filter for the first request, then one kind of filter for each next one, built
    from that request's unfiltered decode `plain[i]` so that it has something to change."""
    filters: list[TokenFilters | None] = [None]
    for i, tokens in enumerate(plain[1:5]):
        common = max(set(tokens), key=tokens.count)
        pair = next([a, b] for a, b in zip(tokens, tokens[1:]) if a != ends[0])
        filters.append([
            TokenFilters(logit_bias={common: -100.0, tokens[-1]: 4.0, ends[0]: -3.5}),
            TokenFilters(allowed_token_ids=sorted(set(tokens) - {common}) + [ends[0]]),
            TokenFilters(bad_words=[[common, common], pair, [tokens[2]]],
                         logit_bias={common: 3.0}),
            TokenFilters(min_tokens=12, end_ids=ends, logit_bias={ends[0]: 30.0}),
        ][i])
    return filters


def assert_respected(tokens: list[int], f: TokenFilters) -> None:
    if f.allowed_token_ids:
        assert set(tokens) <= set(f.allowed_token_ids)
    assert not any(spells(tokens, w) for w in f.bad_words)
    assert not set(tokens[: f.min_tokens]) & set(f.end_ids)


@pytest.mark.parametrize("policy, temperature", [("fixed", 0.0), ("threshold", 0.0),
                                                 ("fixed", 0.8), ("frechet", 0.6)])
def test_llada_filters_decode_as_the_reference(reference, tiny_model, policy, temperature):
    ids = model_ids(tiny_model)
    shape = dict(gen_length=32, block_length=8, steps=16, policy=policy, threshold=0.3)
    ends = [ids["eos"], ids["eot"]]
    prompts = [random_prompt(60 + i, 4 + 5 * i) for i in range(5)]

    def decode(i: int, f: TokenFilters | None) -> list[int]:
        return generate(reference, prompts[i], mask_id=ids["mask"], temperature=temperature,
                        seed=30 + i, token_filters=f, **shape)["tokens"]

    filters = filter_sets([decode(i, None) for i in range(5)], ends)
    driver = CoreDriver(reference, ids["mask"], "cpu", max_rows=8, eos=ids["eos"])
    got = driver.run({0: [(str(i), prompts[i], DllmParams(**shape), temperature, 30 + i, f)
                          for i, f in enumerate(filters[:3])],
                      2: [(str(i), prompts[i], DllmParams(**shape), temperature, 30 + i, f)
                          for i, f in enumerate(filters) if i >= 3]})
    check_against_reference(got, filters, decode)


def check_against_reference(got: dict[str, list[int]], filters: list[TokenFilters | None],
                            decode) -> None:
    """The core's tokens are the reference's with the same filters, and each filter set
    changes the reference's decode and is respected by it."""
    for i, f in enumerate(filters):
        want = decode(i, f)
        assert got[str(i)] == want, i
        if f is not None:
            assert want != decode(i, None), i
            assert_respected(want, f)
            if f.min_tokens:
                assert want != decode(i, TokenFilters(logit_bias=f.logit_bias)), i


@pytest.fixture(scope="module")
def small_dream(tmp_path_factory):
    if dream_files() is None:
        pytest.skip("Dream's files (shared/models/dream-7b-instruct) missing")
    path = write_random_model(tmp_path_factory.mktemp("dream-filters"), seed=4,
                              vocab_size=SMALL_VOCAB)
    return ReferenceDream.from_pretrained(path)


@pytest.mark.parametrize("alg, temperature, seed", [("maskgit_plus", 0.0, 1),
                                                    ("entropy", 0.0, 2), ("origin", 0.5, 3)])
def test_dream_filters_decode_as_the_reference(small_dream, alg, temperature, seed):
    shape = dict(gen_length=16, block_length=16, steps=8, alg=alg)
    ends = [SMALL["eos"], SMALL["eot"]]
    prompts = [small_prompt(seed + 10 * i, 3 + 4 * i) for i in range(5)]

    def decode(i: int, f: TokenFilters | None) -> list[int]:
        return diffusion_generate(small_dream, prompts[i], mask_id=SMALL["mask"],
                                  temperature=temperature, seed=seed + i, token_filters=f,
                                  **shape)["tokens"]

    filters = filter_sets([decode(i, None) for i in range(5)], ends)
    driver = CoreDriver(small_dream, SMALL["mask"], "cpu", max_rows=8, eos=SMALL["eos"],
                        logits_offset=1)
    got = driver.run({0: [(str(i), prompts[i], DllmParams(**shape), temperature, seed + i, f)
                          for i, f in enumerate(filters)]})
    check_against_reference(got, filters, decode)


def test_tokens_committed_together_never_spell_a_bad_word():
    """Two positions that predict a bad word's two tokens with high confidence: the
    iteration commits the first only, and the next bans the second's token there."""
    vocab, mask, word = 8, 7, [3, 4]
    batch = DenoiseBatch(1, 16, SpecialTokens(mask, eos=6, eot=None))
    row = batch.add([1, 2], DllmParams(4, 4, 4, policy="threshold", threshold=0.5), 0.0, 1,
                    token_filters=TokenFilters(bad_words=[word]))
    logits = torch.full((4, vocab), -5.0)
    for column, (best, second) in enumerate([(3, 5), (4, 5), (2, 1), (2, 1)]):
        logits[column, best], logits[column, second] = 6.0, 1.0
    plan = batch.plan([row], torch.zeros(4, dtype=torch.long), torch.arange(4))
    first = batch.step(plan, logits.clone()).tolist()[0]
    assert first[:4] == [3, mask, 2, 2]
    plan = batch.plan([row], torch.zeros(1, dtype=torch.long), torch.tensor([1]))
    second = batch.step(plan, logits[1:2].clone()).tolist()[0]
    assert second[:4] == [3, 5, 2, 2] and second[4] == 1
