"""The decoding core (no vLLM), driven by the reference model, equals reference decoding;
it runs on any device and never synchronises with the host inside an iteration."""

import itertools
import math
from pathlib import Path

import pytest
import torch

from dllm_reference.generate import generate
from dllm_reference.core_driver import CoreDriver
from tests.helpers import SyncCounter, model_ids, random_prompt
from vllm_dllm.params import DllmParams
from vllm_dllm.sampling import noise
from vllm_dllm.sampling.batch import DenoiseBatch, SpecialTokens
from vllm_dllm.sampling.grammar import GrammarPlan
from vllm_dllm.sampling.schedule import transfer_counts
from vllm_dllm.sampling.token_filters import TokenFilters

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_transfer_counts_front_load_remainder():
    counts = [int(transfer_counts(torch.tensor([10]), torch.tensor([4]), torch.tensor([i])))
              for i in range(4)]
    assert counts == [3, 3, 2, 2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, remasking, temperature", list(itertools.product(
    [(32, 8, 16), (32, 32, 8), (16, 8, 32)], ["low_confidence", "random"], [0.0, 0.7])))
def test_batched_core_matches_reference(reference, tiny_model, device, shape, remasking,
                                        temperature):
    mask_id = model_ids(tiny_model)["mask"]
    prompts = [random_prompt(i, 3 + 11 * i) for i in range(3)]
    seeds = [11, 12, 13]
    params = DllmParams(*shape, remasking)
    driver = CoreDriver(reference, mask_id, device)
    # Three requests on two rows to start with: the batch grows; the last joins late.
    got = driver.run({0: [(str(i), prompts[i], params, temperature, seeds[i]) for i in range(2)],
                      3: [("2", prompts[2], params, temperature, seeds[2])]})
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        want = generate(reference, prompt, mask_id=mask_id, gen_length=shape[0],
                        block_length=shape[1], steps=shape[2], remasking=remasking,
                        temperature=temperature, seed=seed)["tokens"]
        assert got[str(i)] == want


def test_requests_with_different_settings_decode_as_alone(reference, tiny_model):
    """Policies, R², block lengths and temperatures mixed in one batch; rows are reused."""
    mask_id = model_ids(tiny_model)["mask"]
    settings = [
        (DllmParams(32, 8, 32, policy="threshold", threshold=0.05), 0.0),
        (DllmParams(32, 16, 16, policy="frechet", frechet_delta=0.01, r2=True,
                    r2_spatial_threshold=0.05, r2_temporal_threshold=0.05,
                    r2_token_cluster="random"), 0.9),
        (DllmParams(16, 16, 8, remasking="random", r2=True, r2_temporal_threshold=0.01), 0.5),
        (DllmParams(32, 8, 8, policy="factor", factor=3.0), 0.0),
    ]
    prompts = [random_prompt(40 + i, 5 + 7 * i) for i in range(len(settings))]
    args = [(str(i), prompts[i], p, t, 100 + i) for i, (p, t) in enumerate(settings)]
    together = CoreDriver(reference, mask_id, "cpu").run({0: args[:2], 2: args[2:]})
    for a in args:
        alone = CoreDriver(reference, mask_id, "cpu").run({0: [a]})
        assert together[a[0]] == alone[a[0]], a


@pytest.mark.parametrize("device", DEVICES)
def test_an_iteration_reads_nothing_back(monkeypatch, device):
    """DenoiseBatch.step, with every optional rule and token filter on, never synchronises
    with the host."""
    vocab, mask = 50, 49
    batch = DenoiseBatch(4, 64, SpecialTokens(mask, eos=47, eot=48), device)
    kinds = [dict(policy="threshold", r2=True, r2_token_cluster="random", logits_eos_inf=True),
             dict(policy="fixed", remasking="random", confidence_eos_eot_inf=True),
             dict(policy="frechet"), dict(policy="factor")]
    filters = [TokenFilters(logit_bias={4: 2.0}, bad_words=[[5, 6, 7], [8]]),
               TokenFilters(allowed_token_ids=[1, 2, 47], min_tokens=4, end_ids=[47, 48]),
               None, TokenFilters(bad_words=[[1, 1]])]
    rows = [batch.add([1, 2, 3], DllmParams(16, 8, 8, **k), t, 5 + i, token_filters=f,
                      num_logprobs=n)
            for i, (k, t, f, n) in enumerate(zip(kinds, [0.0, 0.8, 1.0, 0.0], filters,
                                                 [2, None, 0, None]))]
    request = torch.arange(4).repeat_interleave(8)
    column = torch.arange(8).repeat(4)
    # Requests 0 and 2 structured, with 3 and 1 mask rows from column 0.
    grammar = GrammarPlan(torch.randint(-2**31, 2**31 - 1, (4, 2), dtype=torch.int32,
                                        device=device),
                          *(torch.tensor(v, device=device) for v in
                            ([0, 0, 3, 0], [3, 0, 1, 0], [0, 0, 0, 0])),
                          torch.randint(0, vocab, (4, 8), device=device),
                          torch.rand(4, 8, device=device) < 0.5)
    plan = batch.plan(rows, request, column, grammar=grammar)
    logits = torch.randn(32, vocab, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    counter = SyncCounter(monkeypatch)
    try:
        packed = batch.step(plan, logits)
        assert counter.calls == []
        packed.tolist()  # the caller's one transfer: the counter sees it
        assert counter.calls == ["tolist"]
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        monkeypatch.undo()
    # Block, advance, drafts, records of 2 top logprobs.
    assert packed.shape == (4, 9 + 8 + 8 * 6) and packed.device.type == torch.device(device).type


def test_noise_is_a_function_of_its_counters():
    seed, it, pos = torch.tensor([3, 3, 4]), torch.tensor([0, 1, 0]), torch.tensor([5, 5, 5])
    u = noise.uniforms(seed, it, pos, noise.STREAM_SAMPLE)
    assert torch.equal(u, noise.uniforms(seed, it, pos, noise.STREAM_SAMPLE))
    assert len(set(u.tolist())) == 3 and ((u > 0) & (u < 1)).all()
    assert not torch.equal(u, noise.uniforms(seed, it, pos, noise.STREAM_REMASK))
    # Large seeds use all their bits.
    assert noise.uniforms(torch.tensor(2**40), it[:1], pos[:1], 0) != noise.uniforms(
        torch.tensor(2**41), it[:1], pos[:1], 0)


def test_uniforms_look_uniform():
    u = noise.uniforms(torch.tensor(7), torch.arange(200)[:, None], torch.arange(500)[None, :], 0)
    assert abs(float(u.mean()) - 0.5) < 0.01
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (counts - u.numel() / 10).abs().max() < 5 * math.sqrt(u.numel() / 10)


def test_sampling_follows_softmax_over_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]]).expand(40000, 4)
    u = noise.uniforms(torch.tensor(1), torch.tensor(0), torch.arange(40000), 0)
    for t in (0.5, 1.0, 2.0):
        tokens = noise.sample(logits, torch.full((40000,), t), u)
        freq = torch.bincount(tokens, minlength=4).double() / 40000
        want = torch.softmax(logits[0].double() / t, -1)
        assert freq[3] == 0
        assert torch.allclose(freq, want, atol=0.01), (t, freq, want)


def test_sampling_in_chunks_equals_one_pass(monkeypatch):
    logits = torch.randn(37, 101)
    u = noise.uniforms(torch.tensor(9), torch.tensor(2), torch.arange(37), 0)
    whole = noise.sample(logits, torch.full((37,), 0.7), u)
    monkeypatch.setattr(noise, "SAMPLE_CHUNK_ELEMENTS", 101 * 5)
    assert torch.equal(noise.sample(logits, torch.full((37,), 0.7), u), whole)


@pytest.mark.parametrize("skip", ["none", "es"])
def test_delayed_eos_goes_last_and_is_scored_as_es_stores_it(skip):
    """`delay_eos_generation`: an EOS predicted after a mask gets confidence 0 (it commits
    last), and token skipping reads that 0 as the position's last confidence, as ES-dLLM
    stores it after the delay."""
    vocab, mask, eos = 8, 7, 6
    batch = DenoiseBatch(1, 16, SpecialTokens(mask, eos=eos, eot=None))
    row = batch.add([1, 2], DllmParams(4, 4, 4, delay_eos_generation=True, skip=skip), 0.0, 1)
    logits = torch.full((4, vocab), -10.0)
    logits[0, 3] = 1.0  # a plain token, p ~ 0.9999
    logits[1, eos] = 5.0  # EOS after a mask, most confident of all
    logits[2, 4] = 0.0  # p ~ 0.99
    logits[3, 5] = 2.0
    plan = batch.plan([row], torch.zeros(4, dtype=torch.long), torch.arange(4))
    packed = batch.step(plan, logits).tolist()[0]
    # Without the delay the EOS at column 1 would be the step's one commit.
    assert [c for c in range(4) if packed[c] != mask] == [3]
    if skip == "es":
        assert float(batch.last_conf[row, 2 + 1]) == 0.0
        assert float(batch.last_conf[row, 2 + 0]) > 0.9


def test_delayed_eos_matches_the_reference_on_the_bundled_model():
    """`delay_eos_generation` against the reference's ES rule, on a model that predicts EOS
    (the bundled one pads its answers with it): same canvases and the same number of
    iterations, which the delay changes under the threshold policy."""
    from tokenizers import Tokenizer

    from dllm_reference.modeling import ReferenceLLaDA
    from dllm_reference.tasks import heldout, render_chat

    model_dir = Path(__file__).resolve().parents[1] / "examples" / "llada-tasks"
    ids = model_ids(model_dir)
    model = ReferenceLLaDA.from_pretrained(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    shape = dict(gen_length=32, block_length=8, steps=32, policy="threshold")
    driver = CoreDriver(model, ids["mask"], "cpu", max_rows=6, eos=ids["eos"])
    prompts = [tokenizer.encode(render_chat(p.prompt)).ids for p in heldout(6)]
    for i, prompt in enumerate(prompts):
        driver.add(str(i), prompt, DllmParams(**shape, delay_eos_generation=True), 0.0, i)
    got = driver.run()
    changed = 0
    for i, prompt in enumerate(prompts):
        want = generate(model, prompt, mask_id=ids["mask"], delay_eos_generation=True,
                        eos_id=ids["eos"], **shape)
        assert got[str(i)] == want["tokens"]
        assert driver.states[str(i)][0].iterations == want["forwards"]
        changed += want["forwards"] != generate(model, prompt, mask_id=ids["mask"],
                                                **shape)["forwards"]
    assert changed
