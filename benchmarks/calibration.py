"""How sure a checkpoint is where threshold decoding commits, on the reference model (CPU).

    python -m benchmarks.calibration examples/llada-long [-n 100]

Threshold decoding loses an answer whenever one token it commits in parallel is wrong, so
what decides its accuracy loss is the confidence band just above the threshold. Per family
of the checkpoint's suite:

* block starts: the gold answer given up to each block start, everything after masked (a
  block's first iteration); the model's predictions for the answer's tokens of that block,
  binned by confidence, with the share that differ from the gold;
* first errors: threshold decoding (eval_reference.threshold_generate) of each prompt; for
  every wrong answer, the confidence at which its earliest-committed wrong token was
  committed (an answer that only runs past the gold's end has none).
"""

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer

from benchmarks.eval_reference import answer_text, checkpoint_tasks, threshold_generate
from dllm_reference import tasks
from dllm_reference.modeling import ReferenceLLaDA

BANDS = (0.5, 0.9, 0.99, 0.999, 1.0)


def band_of(confidence: float) -> int:
    return next(i for i, hi in enumerate(BANDS) if confidence < hi or hi == BANDS[-1])


def calibrate(path: Path, n: int, threshold: float) -> str:
    families, gen_length, block_length = checkpoint_tasks(path)
    model = ReferenceLLaDA.from_pretrained(path).eval()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    mask_id, eot = model.config["mask_token_id"], model.config["eot_token_id"]
    stop_ids = {eot, model.config["eos_token_id"]}
    problems = tasks.heldout(n * len(families), families=families)
    lines = [f"{n} held-out prompts per family, gen_length {gen_length}, block_length "
             f"{block_length}, threshold {threshold}"]
    with torch.inference_mode():
        for family in families:
            counts, wrong = [0] * len(BANDS), [0] * len(BANDS)
            first_errors, failed = [], 0
            for problem in (p for p in problems if p.family == family):
                prompt = tokenizer.encode(tasks.render_chat(problem.prompt)).ids
                gold = tokenizer.encode(problem.answer).ids + [eot]
                for b in range(0, len(gold), block_length):
                    x = torch.tensor(prompt + gold[:b] + [mask_id] * (gen_length - b))
                    rows = slice(len(prompt) + b, len(prompt) + min(b + block_length, len(gold)))
                    conf, top = torch.softmax(model(x)[rows].double(), -1).max(-1)
                    for c, t, g in zip(conf.tolist(), top.tolist(), gold[b:b + block_length]):
                        band = band_of(c)
                        counts[band] += 1
                        wrong[band] += t != g
                out = threshold_generate(model, prompt, mask_id=mask_id, gen_length=gen_length,
                                         block_length=block_length, threshold=threshold)
                if tasks.score(answer_text(tokenizer, out["tokens"], stop_ids), problem.answer):
                    continue
                failed += 1
                errors = [i for i, g in enumerate(gold) if out["tokens"][i] != g]
                if errors:
                    first = min(errors, key=lambda i: (out["committed_at"][i], i))
                    first_errors.append(out["confidence"][first])
            lines.append(f"{family}: block starts")
            lo = 0.0
            for i, hi in enumerate(BANDS):
                close = "]" if i == len(BANDS) - 1 else ")"
                share = wrong[i] / max(1, counts[i])
                lines.append(f"  confidence [{lo:.3f}, {hi:.3f}{close}: {counts[i]:5d} "
                             f"predictions, {share:6.1%} wrong")
                lo = hi
            traced = ", ".join(f"{c:.3f}" for c in sorted(first_errors))
            lines.append(f"{family}: threshold decoding, {failed} of {n} answers wrong; first "
                         f"wrong token's confidence in {len(first_errors)} of them: "
                         f"{traced or '-'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-n", "--num-prompts", type=int, default=100, help="per family")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(calibrate(args.checkpoint, args.num_prompts, args.threshold))


if __name__ == "__main__":
    main()
