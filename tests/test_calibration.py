"""benchmarks/calibration.py and the threshold decoder it replays: the commit record must be
the decoding's own (same tokens as the reference's threshold policy, one forward per
iteration, confidences at or above the threshold but for the forced commit)."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from benchmarks.calibration import calibrate
from benchmarks.eval_reference import threshold_generate
from dllm_reference import tasks
from dllm_reference.generate import generate
from dllm_reference.modeling import ReferenceLLaDA

pytestmark = pytest.mark.slow

MODEL = Path(__file__).resolve().parents[1] / "examples" / "llada-long"


def test_threshold_commit_record_is_the_decodings_own():
    model = ReferenceLLaDA.from_pretrained(MODEL).eval()
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    mask_id = model.config["mask_token_id"]
    for problem in tasks.heldout(2, families=tasks.LONG):
        prompt = tokenizer.encode(tasks.render_chat(problem.prompt)).ids
        out = threshold_generate(model, prompt, mask_id=mask_id, gen_length=128,
                                 block_length=32, threshold=0.9)
        want = generate(model, prompt, mask_id=mask_id, gen_length=128, block_length=32,
                        policy="threshold", threshold=0.9, temperature=0.0)
        assert out["tokens"] == want["tokens"]
        forwards = out["committed_at"]
        assert set(forwards) == set(range(out["forwards"]))
        # Blocks are decoded one after the other.
        for block in range(32, 128, 32):
            assert max(forwards[:block]) < min(forwards[block:block + 32])
        for k in range(out["forwards"]):
            low = [c for f, c in zip(forwards, out["confidence"]) if f == k and c < 0.9]
            assert len(low) <= 1


def test_calibration_reports_every_family_and_band():
    report = calibrate(MODEL, 2, 0.9)
    for family in tasks.LONG:
        assert f"{family}: block starts" in report
        assert f"{family}: threshold decoding" in report
    assert report.count("predictions") == 5 * len(tasks.LONG)
