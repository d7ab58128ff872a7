"""The decoding core (no vLLM) driven by the reference model equals reference decoding."""

import itertools

import pytest
import torch

from tests.helpers import model_ids, random_prompt
from tests.reference.generate import generate
from vllm_dllm.params import DllmParams
from vllm_dllm.sampling.schedule import transfer_counts
from vllm_dllm.sampling.state import DenoiseState
from vllm_dllm.sampling.step import Denoiser, SpecialTokens


def test_transfer_counts_front_load_remainder():
    counts = [int(transfer_counts(torch.tensor([10]), torch.tensor([4]), torch.tensor([i])))
              for i in range(4)]
    assert counts == [3, 3, 2, 2]


def decode_batch(model, mask_id, prompts, params, temperature, seeds):
    states = [DenoiseState(len(p), params, mask_id, temperature, s) for p, s in zip(prompts, seeds)]
    denoiser = Denoiser(SpecialTokens(mask_id, eos=-1, eot=None))
    while not all(s.finished for s in states):
        active = [(str(i), s, p) for i, (s, p) in enumerate(zip(states, prompts)) if not s.finished]
        positions, rows = [], []
        for _, state, prompt in active:
            logits = model(torch.cat([torch.tensor(prompt), state.canvas]))
            masked = state.masked_in_block()
            positions.append(masked)
            rows.append(logits[len(prompt) + masked])
        denoiser.step([k for k, _, _ in active], [s for _, s, _ in active], positions,
                      torch.cat(rows))
    return [s.canvas.tolist() for s in states]


@pytest.mark.parametrize("shape, remasking, temperature", list(itertools.product(
    [(32, 8, 16), (32, 32, 8), (16, 8, 32)], ["low_confidence", "random"], [0.0, 0.7])))
def test_batched_core_matches_reference(reference, tiny_model, shape, remasking, temperature):
    mask_id = model_ids(tiny_model)["mask"]
    prompts = [random_prompt(i, 3 + 11 * i) for i in range(3)]
    seeds = [11, 12, 13]
    params = DllmParams(*shape, remasking)
    got = decode_batch(reference, mask_id, prompts, params, temperature, seeds)
    for prompt, seed, tokens in zip(prompts, seeds, got):
        want = generate(reference, prompt, mask_id=mask_id, gen_length=shape[0],
                        block_length=shape[1], steps=shape[2], remasking=remasking,
                        temperature=temperature, seed=seed)["tokens"]
        assert tokens == want
