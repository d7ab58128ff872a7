"""The bundled long-answer models through the plugin. examples/llada-long: its served shape
(gen_length 128, blocks of 32) from the folder, the reference's answers, and mostly right;
in bfloat16 (`--dtype bfloat16`, the real models' dtype) the answers float32 gives.
examples/sdar-long (block diffusion, blocks of 32): the reference block decoder's tokens."""

import json

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from dllm_reference import block_diffusion, tasks
from dllm_reference.modeling import ReferenceLLaDA
from dllm_reference.sdar import ReferenceSDAR, block_length
from tests.helpers import cut_after_end, inproc_engine, reference_tokens, shutdown

pytestmark = pytest.mark.slow

MODEL = Path(__file__).resolve().parents[1] / "examples" / "llada-long"
BLOCK_MODEL = MODEL.parent / "sdar-long"
PROMPTS = 6  # three of each family
BF16_PROMPTS = 40
# At least this many of each family's 3 prompts right, per configuration. Its README's
# held-out accuracy (vanilla: running_sum 97.0%, count 84.0%; threshold 0.9: 95.5% / 93.5%)
# makes 2 of 3 likely (P >= 0.9) for each.
MIN_RIGHT_OF_3 = {"vanilla": {"running_sum": 2, "count": 2},
                  "threshold+dual": {"running_sum": 2, "count": 2}}

CONFIGS = {
    "vanilla": {"steps": 128, "remasking": "low_confidence"},
    "threshold+dual": {"policy": "threshold", "threshold": 0.9, "cache": "dual"},
}


@pytest.fixture(scope="module")
def llm():
    engine, _ = inproc_engine(MODEL, max_model_len=256, max_num_seqs=BF16_PROMPTS)
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def problems():
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    return [(p, tokenizer.encode(tasks.render_chat(p.prompt)).ids)
            for p in tasks.heldout(PROMPTS, families=tasks.LONG)]


def right_answers(llm, model: Path, problems, xargs: dict, want) -> dict[str, int]:
    """Decodes `problems` greedily with `xargs` (no gen_length/block_length: the folder's
    generation_config.json sets them), checks each canvas against `want(ids)`, the
    reference's, and counts the right answers per family."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=128, extra_args=dict(xargs))
    outputs = llm.generate([{"prompt_token_ids": ids} for _, ids in problems], params,
                           use_tqdm=False)
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    right = dict.fromkeys(tasks.LONG, 0)
    for (problem, ids), out in zip(problems, outputs):
        expected = want(ids)
        assert list(out.outputs[0].token_ids) == expected, problem
        right[problem.family] += tasks.score(
            tokenizer.decode(expected, skip_special_tokens=True), problem.answer)
    return right


@pytest.mark.parametrize("name", CONFIGS)
def test_plugin_gives_the_reference_answers(llm, problems, name):
    xargs = CONFIGS[name]
    reference = ReferenceLLaDA.from_pretrained(MODEL)
    right = right_answers(llm, MODEL, problems, xargs, lambda ids: reference_tokens(
        reference, MODEL, ids, gen_length=128, block_length=32, temperature=0.0,
        **{"steps": 128, **xargs}))
    assert all(right[f] >= n for f, n in MIN_RIGHT_OF_3[name].items()), right


def test_bfloat16_gives_the_float32_answers(llm):
    """A new user's `--dtype bfloat16` on the bundled float32 checkpoint: threshold decoding
    of 40 held-out prompts gives float32's answers, but for at most 1 in 20, and scores no
    worse than one answer below it. Kernels that round differently part on near-ties, so
    this compares answers, not canvases."""
    from vllm import SamplingParams

    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    problems = tasks.heldout(BF16_PROMPTS, families=tasks.LONG)
    prompts = [{"prompt_token_ids": tokenizer.encode(tasks.render_chat(p.prompt)).ids}
               for p in problems]
    params = SamplingParams(temperature=0.0, max_tokens=128,
                            extra_args={"policy": "threshold", "threshold": 0.9})
    bf16, _ = inproc_engine(MODEL, max_model_len=256, max_num_seqs=BF16_PROMPTS,
                            dtype="bfloat16")
    try:
        assert bf16.llm_engine.model_config.dtype == torch.bfloat16
        answers = [[o.outputs[0].text for o in engine.generate(prompts, params, use_tqdm=False)]
                   for engine in (llm, bf16)]
    finally:
        shutdown(bf16)
    right = [sum(tasks.score(a, p.answer) for a, p in zip(found, problems))
             for found in answers]
    # Measured: 39 of 40 answers alike, the other one right in bfloat16 only.
    assert sum(a != b for a, b in zip(*answers)) <= BF16_PROMPTS // 20, answers
    assert right[1] >= right[0] - 1, right


# examples/sdar-long's README (prompts 0-399): running_sum 97.5% one token per step, 98% at
# threshold 0.9; count (71.5% and 90%) is not asked for, its end is what the model misses.
BLOCK_MIN_RIGHT_OF_3 = {"running_sum": 2}
BLOCK_CONFIGS = {"one-per-step": {"policy": "fixed"},
                 "threshold": {"policy": "threshold", "threshold": 0.9}}


@pytest.fixture(scope="module")
def block_llm():
    engine, _ = inproc_engine(BLOCK_MODEL, max_model_len=256, max_num_seqs=PROMPTS)
    yield engine
    shutdown(engine)


@pytest.mark.parametrize("name", BLOCK_CONFIGS)
def test_block_model_gives_the_reference_answers(block_llm, problems, name):
    xargs = BLOCK_CONFIGS[name]
    reference = ReferenceSDAR.from_pretrained(BLOCK_MODEL).eval()
    ends = tuple(json.loads((BLOCK_MODEL / "generation_config.json").read_text())["eos_token_id"])

    def want(ids: list[int]) -> list[int]:
        with torch.inference_mode():
            canvas = block_diffusion.generate(
                reference, ids, mask_id=reference.config["mask_token_id"], gen_length=128,
                block_length=block_length(reference.config), stop_ids=ends, **xargs)["tokens"]
        return cut_after_end(canvas, ends)[:128]

    right = right_answers(block_llm, BLOCK_MODEL, problems, xargs, want)
    assert all(right[f] >= n for f, n in BLOCK_MIN_RIGHT_OF_3.items()), right
