"""Benchmark harness for vllm-dllm: decoding configurations side by side on one engine.

    python -m benchmarks.harness accuracy [--model examples/llada-tasks,examples/llada-long]
                                          [--num-prompts 1000] [--configs vanilla,dual,...]
                                          [--config NAME=JSON] [--out benchmarks/results/accuracy]
    python -m benchmarks.harness cost [--d-model 768 --n-layers 4 --steps 256 ...] [--out DIR]

accuracy (benchmarks/accuracy.py): per model (both bundled checkpoints by default, one
  after the other), one in-process vLLM engine; each configuration (a dict of
  SamplingParams extra_args, see benchmarks/configs.py) decodes the same held-out prompts
  of the model's suite of dllm_reference/tasks.py, all submitted at once. Reports accuracy
  per family, output tokens/s, model iterations per request (counted at the scheduler),
  tokens per iteration, speedup vs the first configuration and peak RSS; `--reference`
  decodes again with the reference (benchmarks/reference_check.py). A configuration the
  plugin rejects is reported as skipped, with the plugin's message.
cost (benchmarks/cost.py): a random-weight LLaDA big enough to be compute-bound, `--batch`
  requests at a time, gen_length 256 / block 32 with cache none, prefix and dual and token
  skipping on dual: wall time per batch, tokens/s and the ratio vs none (issue 4: dual >=
  4x, prefix >= 2x) and vs dual.

Both run on benchmarks/instrumented.py's engine. Each mode writes <mode>.json, <mode>.md
and <mode>.png into --out (accuracy: into --out/<model folder name>/ when several models
run).
"""

import os

# Before vLLM is imported anywhere: a small KV cache, quiet logs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks import configs as cfgs  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.accuracy import DEFAULT_NUM_PROMPTS, run_accuracy  # noqa: E402
from benchmarks.cost import run_cost  # noqa: E402
from benchmarks.instrumented import log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

THREADS_HELP = ("torch/OpenMP threads of the engine (0: vLLM's default, all cores). Default 1: "
                "on a CPU shared with other jobs, OpenMP threads that wait for each other at "
                "every barrier make 2 threads up to 10x slower than 1 and the timings "
                "erratic; pass 0 on a dedicated machine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)

    acc = sub.add_parser("accuracy", help="accuracy and speed of decoding configurations")
    acc.add_argument("--model", default=",".join(cfgs.DEFAULT_MODELS),
                     help="comma list of checkpoint folders, run one after the other "
                          "(default: %(default)s)")
    acc.add_argument("--num-prompts", "-n", type=int, default=None,
                     help="held-out prompts per model (the suite's families interleaved); "
                          "default: " + ", ".join(f"{n} for {m}" for m, n in
                                                   cfgs.DEFAULT_MODELS.items())
                          + f", {DEFAULT_NUM_PROMPTS} for others")
    acc.add_argument("--gen-length", type=int, default=None,
                     help="default: the model's (32 for llada-tasks, 128 for llada-long)")
    acc.add_argument("--block-length", type=int, default=None,
                     help="default: the model's (8 for llada-tasks, 32 for llada-long)")
    acc.add_argument("--configs", help="comma list of default configurations to run "
                     "(default: all of " + ",".join(c.name for c in cfgs.accuracy_configs())
                     + ")")
    acc.add_argument("--config", action="append", metavar="NAME=JSON",
                     help="an extra configuration: name and extra_args as a JSON object "
                          "(repeatable), e.g. 'thr0.7={\"policy\":\"threshold\","
                          "\"threshold\":0.7,\"gen_length\":32,\"block_length\":8}'")
    acc.add_argument("--repeats", type=int, default=3,
                     help="timed rounds over all configurations (median wall time reported; "
                          "answers from the first round)")
    acc.add_argument("--max-num-seqs", type=int, default=64)
    acc.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    acc.add_argument("--max-model-len", type=int, default=None,
                     help="default: the model's max_sequence_length, at most 1024")
    acc.add_argument("--save-samples", action="store_true",
                     help="keep every prompt's answer in the JSON (default: a few)")
    acc.add_argument("--reference", metavar="NAMES",
                     help="comma list of fixed-schedule configurations to decode again with "
                          "the reference (dllm_reference, one prompt at a time): its accuracy "
                          "and the share of identical answers")
    acc.add_argument("--out", type=Path, default=None,
                     help="output folder (default benchmarks/results/accuracy-<date>)")

    cost = sub.add_parser("cost", help="cost of the KV cache modes on a compute-bound model")
    cost.add_argument("--model", default=None,
                      help="an existing LLaDA folder instead of the random model")
    cost.add_argument("--d-model", type=int, default=768)
    cost.add_argument("--n-layers", type=int, default=4)
    cost.add_argument("--head-dim", type=int, default=64)
    cost.add_argument("--mlp-hidden-size", type=int, default=2048)
    cost.add_argument("--prompt-len", type=int, default=64)
    cost.add_argument("--gen-length", type=int, default=cfgs.COST_GEN_LENGTH)
    cost.add_argument("--block-length", type=int, default=cfgs.COST_BLOCK_LENGTH)
    cost.add_argument("--steps", type=int, default=None, help="default: gen_length")
    cost.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    cost.add_argument("--batch", type=int, default=1,
                      help="requests decoded together (each its own random prompt)")
    cost.add_argument("--configs", help="comma list of the configurations to run "
                      "(default: all of " + ", ".join(
                          cfgs.COST_CACHES + tuple(cfgs.COST_SKIPS)) + ")")
    cost.add_argument("--repeats", type=int, default=1,
                      help="requests per cache mode (median reported)")
    cost.add_argument("--out", type=Path, default=None,
                      help="output folder (default benchmarks/results/cost-<date>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / \
        f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.mode == "cost":
        runs = [(run_cost(args), Path(out))]
    else:
        models = cfgs.names(args.model)
        runs = [(run_accuracy(args, m), Path(out) / Path(m).name if len(models) > 1 else Path(out))
                for m in models]
    for data, folder in runs:
        paths = report.render(data, folder)
        print(Path(paths["md"]).read_text())
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        log(f"done in {data['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
