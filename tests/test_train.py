"""benchmarks/train.py: a seed fixes the run, and the checkpoint carries its suite and shape."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.train import Encoder, threshold_state_masks, training_masks
from dllm_reference import tasks
from dllm_reference.modeling import ReferenceLLaDA
from dllm_reference.tiny_llada import build_vocab

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, seed: int, *options: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "benchmarks.train", "--suite", "long", "--out", str(out),
         "--seed", str(seed), "--steps", "3", "--batch-size", "6", "--warmup", "1",
         "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--mlp-hidden-size", "64",
         "--eval-prompts", "0", "--threads", "1", *options],
        cwd=ROOT, check=True, capture_output=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """LLaDA checkpoints a and b trained with seed 0, c with seed 1 (every kind of row);
    SDAR checkpoints d and e (seed 0) and f (seed 1) trained from a with blocks of 4."""
    root = tmp_path_factory.mktemp("train")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(root / name, seed, "--ordered-fraction", "0.5", "--threshold-fraction", "0.3")
    for name, seed in (("d", 0), ("e", 0), ("f", 1)):
        train(root / name, seed, "--arch", "sdar", "--block-length", "4",
              "--init-from", str(root / "a"))
    return root


@pytest.mark.parametrize("same, other", [("ab", "c"), ("de", "f")], ids=["llada", "sdar"])
def test_same_seed_same_weights_other_seed_other_weights(runs, same, other):
    a, b, c = (load_file(str(runs / n / "model.safetensors")) for n in same + other)
    assert a.keys() == b.keys() == c.keys()
    assert all(a[k].equal(b[k]) for k in a)
    assert not all(a[k].equal(c[k]) for k in a)


def test_sdar_checkpoint_is_sdar_with_its_block(runs):
    config = json.loads((runs / "d" / "config.json").read_text())
    assert (config["model_type"], config["block_size"]) == ("sdar", 4)
    generation = json.loads((runs / "d" / "generation_config.json").read_text())
    assert generation["dllm"] == {"gen_length": 128, "block_length": 4}
    assert "model.layers.1.self_attn.q_norm.weight" in load_file(
        str(runs / "d" / "model.safetensors"))


def test_checkpoint_records_suite_and_served_shape(runs):
    assert json.loads((runs / "a" / "tasks.json").read_text()) == {"suite": "long"}
    generation = json.loads((runs / "a" / "generation_config.json").read_text())
    assert generation["dllm"] == {"gen_length": 128, "block_length": 32}


def test_long_suite_answers_fit_the_canvas_and_vary_in_length():
    problems = tasks.heldout(1000, families=tasks.LONG)
    assert len({p.prompt for p in problems}) == 1000
    assert all(tasks.split_of(p.prompt) == "heldout" for p in problems)
    for family in tasks.LONG:
        lengths = [len(p.answer) for p in problems if p.family == family]
        assert min(lengths) >= 40 and max(lengths) <= 120
        assert max(lengths) - min(lengths) >= 40, family


def test_running_sum_writes_its_working_step_by_step():
    problem = next(p for p in tasks.heldout(20, families=tasks.LONG) if p.family == "running_sum")
    numbers = [int(x) for x in problem.prompt.split(":")[1].split()]
    steps = problem.answer.split(", ")
    assert len(steps) == len(numbers) - 1
    total = numbers[0]
    for step, addend in zip(steps, numbers[1:]):
        assert step == f"{total}+{addend}={total + addend}"
        total += addend


def test_ordered_rows_give_a_prefix_and_score_the_rest_of_its_block():
    starts = torch.tensor([5, 9, 7, 5] * 50)
    answered = torch.tensor([41, 120, 77, 63] * 50)
    length, canvas, block = 9 + 128, 128, 32
    generator = torch.Generator().manual_seed(0)
    masked, scored, weight = training_masks(starts, answered, length, canvas, generator,
                                            ordered_fraction=1.0, block_length=block)
    for row, (start, n) in enumerate(zip(starts.tolist(), answered.tolist())):
        (hidden,) = masked[row].nonzero(as_tuple=True)
        cut = int(hidden[0])
        assert start <= cut < start + n  # a position of the answer, its end included
        # Everything before the cut given (prompt included), everything from it masked.
        assert hidden.tolist() == list(range(cut, start + canvas))
        block_end = start + ((cut - start) // block + 1) * block
        assert scored[row].nonzero().squeeze(1).tolist() == list(range(cut, block_end))
        assert torch.all(weight[row] == canvas / block)
    cuts = (masked.long().argmax(1) - starts)[answered == 120].tolist()
    assert min(cuts) < 16 and max(cuts) > 100  # over the whole answer


def threshold_states(threshold: float, seed: int = 3):
    problems = tasks.heldout(24, families=tasks.LONG)
    tokens, attention_mask, starts, answered = Encoder(build_vocab(), 128).batch(problems)
    model = ReferenceLLaDA.from_pretrained(ROOT / "examples" / "llada-long")
    mask_id = model.config["mask_token_id"]
    masks = threshold_state_masks(model, tokens, attention_mask, starts, answered, 128,
                                  mask_id, torch.Generator().manual_seed(seed),
                                  threshold=threshold, max_forwards=3)
    return model, tokens, attention_mask, starts, answered, masks


def test_threshold_states_give_a_block_start_then_what_the_model_commits():
    model, tokens, attention_mask, starts, answered, (masked, scored, weight) = \
        threshold_states(1.01)
    mask_id = model.config["mask_token_id"]
    revealed = []
    for row, (start, n) in enumerate(zip(starts.tolist(), answered.tolist())):
        block = (int(masked[row].nonzero()[0]) - start) // 32 * 32 + start
        assert start <= block < start + n and not masked[row, :block].any()
        assert masked[row, block + 32: start + 128].all()
        assert scored[row].nonzero()[:, 0].tolist() == [
            i for i in range(block, block + 32) if masked[row, i]]
        # At a threshold nothing reaches, each forward commits only its most confident token.
        given = (~masked[row, block: block + 32]).nonzero()[:, 0].tolist()
        revealed.append(len(given))
        if len(given) == 1:
            pos = torch.arange(tokens.shape[1])
            x = torch.where((pos >= block) & (pos < start + 128), mask_id, tokens[row])
            with torch.no_grad():
                logits = model(x[None], attention_mask[row][None])[0, block: block + 32]
            assert given == [int(torch.softmax(logits, -1).amax(-1).argmax())]
    assert set(revealed) == {0, 1, 2, 3}
    assert torch.all(weight == 128 / 32)
    # At 0.9 a forward commits many tokens, yet never a whole block.
    scored = threshold_states(0.9)[-1][1]
    assert (32 - scored.sum(1)).max() > 3 and scored.sum(1).min() >= 1


def test_unordered_rows_are_llada_masking():
    starts = torch.tensor([4, 6] * 100)
    generator = torch.Generator().manual_seed(1)
    masked, scored, weight = training_masks(starts, torch.tensor([20, 9] * 100), 6 + 32, 32,
                                            generator)
    assert scored.equal(masked)
    pos = torch.arange(38)[None]
    assert not masked[pos < starts[:, None]].any()  # the prompt is never masked
    # Each row's weight is 1 / t, t its masked share (about, for 32 tokens).
    share = masked.sum(1) / 32
    t = 1 / weight[:, 0]
    assert (share - t).abs().mean() < 0.1
