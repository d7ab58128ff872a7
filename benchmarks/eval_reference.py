"""Scores a LLaDA or SDAR checkpoint on held-out tasks with the reference decoders, on the CPU.

    python -m benchmarks.eval_reference examples/llada-tasks [-n 300] [--skip 0] [--block-length 32]

The checkpoint's `tasks.json` names its suite of dllm_reference/tasks.py (short if absent) and
its generation_config.json the canvas and block length. Two decoders, at temperature 0:

* vanilla: dllm_reference/generate.py with steps = gen_length (one token per step,
  low-confidence remasking), the quality reference;
* threshold: per block, every forward commits each masked position whose confidence
  is >= the threshold, and always the most confident one (Fast-dLLM's parallel rule).
  It is here only to measure how confident the model is: tokens per iteration.

An SDAR checkpoint (block-causal) is decoded by dllm_reference/block_diffusion.py instead,
vanilla with one token per step and threshold with its threshold rule, both block by block.
"""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from dllm_reference import block_diffusion, tasks
from dllm_reference.generate import generate
from dllm_reference.modeling import ReferenceDecoder, ReferenceLLaDA
from dllm_reference.sdar import ReferenceSDAR

def checkpoint_tasks(path: str | Path) -> tuple[tuple[str, ...], int, int]:
    """The families a checkpoint was trained on, and its gen_length and block_length."""
    path = Path(path)
    suite = "short"
    if (path / "tasks.json").exists():
        suite = json.loads((path / "tasks.json").read_text())["suite"]
    dllm = json.loads((path / "generation_config.json").read_text()).get("dllm", {})
    gen_length = dllm.get("gen_length", 32)
    return tasks.SUITES[suite], gen_length, dllm.get("block_length", gen_length)


def threshold_generate(model: ReferenceLLaDA, prompt: list[int], *, mask_id: int,
                       gen_length: int, block_length: int, threshold: float = 0.9) -> dict:
    """Greedy threshold decoding; returns the canvas, the number of forward passes, and
    per canvas position the forward that committed it and its confidence then."""
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    committed_at = torch.zeros(len(x), dtype=torch.long)
    confidence = torch.zeros(len(x), dtype=torch.double)
    forwards = 0
    for start in range(len(prompt), len(prompt) + gen_length, block_length):
        block = slice(start, start + block_length)
        while bool((x[block] == mask_id).any()):
            probs = torch.softmax(model(x)[block].double(), -1)
            conf, x0 = probs.max(-1)
            masked = x[block] == mask_id
            conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
            commit = masked & (conf >= threshold)
            commit[conf.argmax()] = True
            x[block] = torch.where(commit, x0, x[block])
            committed_at[block] = torch.where(commit, forwards, committed_at[block])
            confidence[block] = torch.where(commit, conf, confidence[block])
            forwards += 1
    n = len(prompt)
    return {"tokens": x[n:].tolist(), "forwards": forwards,
            "committed_at": committed_at[n:].tolist(), "confidence": confidence[n:].tolist()}


@dataclass
class FamilyScore:
    gen_length: int
    n: int = 0
    vanilla_correct: int = 0
    threshold_correct: int = 0
    threshold_forwards: int = 0

    @property
    def tokens_per_iteration(self) -> float:
        return self.n * self.gen_length / max(1, self.threshold_forwards)


@dataclass
class Report:
    gen_length: int
    block_length: int
    threshold: float
    block_causal: bool = False
    families: dict[str, FamilyScore] = field(default_factory=dict)

    def vanilla_accuracy(self) -> float:
        """Mean over families of the per-family exact-match rate."""
        return sum(f.vanilla_correct / f.n for f in self.families.values()) / len(self.families)

    def threshold_accuracy(self) -> float:
        return sum(f.threshold_correct / f.n for f in self.families.values()) / len(self.families)

    def tokens_per_iteration(self) -> float:
        n = sum(f.n for f in self.families.values())
        return n * self.gen_length / sum(f.threshold_forwards for f in self.families.values())


def stop_ids(path: str | Path) -> set[int]:
    """The tokens an answer ends at: config.json's end ids (LLaDA's eot and eos) and
    generation_config.json's, which is where SDAR's folder names them."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    ids = {config[k] for k in ("eos_token_id", "eot_token_id") if config.get(k) is not None}
    if isinstance(generation, int):
        generation = [generation]
    return ids | set(generation or [])


def answer_text(tokenizer: Tokenizer, tokens: list[int], stop_ids: set[int]) -> str:
    """The decoded canvas up to the first stop token (`<|eot_id|>` or `<|endoftext|>`)."""
    end = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=False)


def block_generate(model: ReferenceDecoder, prompt: list[int], *, mask_id: int,
                   gen_length: int, block_length: int, threshold: float, stop_ids: set[int]
                   ) -> tuple[dict, dict]:
    """Greedy block-diffusion decoding of a block-causal model: one token per step
    (`fixed`), and the threshold rule; each {"tokens", "forwards", ...}."""
    runs = ({"policy": "fixed"}, {"policy": "threshold", "threshold": threshold})
    return tuple(block_diffusion.generate(model, prompt, mask_id=mask_id, gen_length=gen_length,
                                          block_length=block_length,
                                          stop_ids=tuple(sorted(stop_ids)), **run)
                 for run in runs)


def evaluate(path: str | Path, n: int, block_length: int | None = None,
             threshold: float = 0.9, skip: int = 0) -> Report:
    """Scores held-out prompts skip .. skip + n - 1 (the split's order is fixed, so prompts
    past those a checkpoint was chosen on give an unbiased second look)."""
    path = Path(path)
    families, gen_length, default_block = checkpoint_tasks(path)
    block_length = block_length or default_block
    config = json.loads((path / "config.json").read_text())
    block_causal = config.get("model_type") == "sdar"
    model: ReferenceDecoder = (ReferenceSDAR if block_causal else ReferenceLLaDA
                               ).from_pretrained(path).eval()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    mask_id = model.config["mask_token_id"]
    ends = stop_ids(path)
    report = Report(gen_length, block_length, threshold, block_causal)
    with torch.inference_mode():
        for problem in tasks.heldout(skip + n, families=families)[skip:]:
            prompt = tokenizer.encode(tasks.render_chat(problem.prompt)).ids
            if block_causal:
                vanilla, fast = block_generate(model, prompt, mask_id=mask_id,
                                               gen_length=gen_length, block_length=block_length,
                                               threshold=threshold, stop_ids=ends)
            else:
                vanilla = generate(model, prompt, mask_id=mask_id, gen_length=gen_length,
                                   block_length=block_length, steps=gen_length,
                                   remasking="low_confidence", temperature=0.0)
                fast = threshold_generate(model, prompt, mask_id=mask_id, gen_length=gen_length,
                                          block_length=block_length, threshold=threshold)
            score = report.families.setdefault(problem.family, FamilyScore(gen_length))
            score.n += 1
            score.vanilla_correct += tasks.score(
                answer_text(tokenizer, vanilla["tokens"], ends), problem.answer)
            score.threshold_correct += tasks.score(
                answer_text(tokenizer, fast["tokens"], ends), problem.answer)
            score.threshold_forwards += fast["forwards"]
    return report


def format_report(report: Report) -> str:
    vanilla = ("block diffusion, one token per step (fixed)" if report.block_causal
               else f"steps {report.gen_length} low_confidence")
    lines = [f"gen_length {report.gen_length}, block_length {report.block_length}, temperature 0; "
             f"vanilla = {vanilla}, threshold = {report.threshold}",
             f"{'family':<14}{'n':>5}{'vanilla':>10}{'threshold':>11}{'tok/iter':>10}"]
    for name in tasks.FAMILIES:
        f = report.families.get(name)
        if f is not None:
            lines.append(f"{name:<14}{f.n:>5}{f.vanilla_correct / f.n:>10.1%}"
                         f"{f.threshold_correct / f.n:>11.1%}{f.tokens_per_iteration:>10.2f}")
    n = sum(f.n for f in report.families.values())
    lines.append(f"{'average':<14}{n:>5}{report.vanilla_accuracy():>10.1%}"
                 f"{report.threshold_accuracy():>11.1%}{report.tokens_per_iteration():>10.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-n", "--num-prompts", type=int, default=300)
    parser.add_argument("--skip", type=int, default=0,
                        help="start after this many held-out prompts (default 0)")
    parser.add_argument("--block-length", type=int, default=None,
                        help="default: the checkpoint's generation_config.json")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(format_report(evaluate(args.checkpoint, args.num_prompts, args.block_length,
                                 args.threshold, args.skip)))


if __name__ == "__main__":
    main()
