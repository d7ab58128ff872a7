"""Tensor parallelism TP=1 vs TP=2 on the compute-bound random model, side by side.

    python -m benchmarks.tp_bench [--repeats 2] [--out benchmarks/results/tp]

Three engines (vLLM's multiprocessing executor) stay up together and take turns on
the same batch, so load drifts hit all alike: TP=1 bound to one core, TP=1 with
two OpenMP threads on both cores, and TP=2 with one core per rank
(`VLLM_CPU_OMP_THREADS_BIND`). The model is the one of `harness cost` (d_model 768,
4 layers, head_dim 64: 12 heads, 6 per rank). On a 2-core CPU this measures what
tensor parallelism costs (an all-reduce after every attention and MLP block, an
all-gather of the logits, and ranks waiting for each other), not what it gains on
GPUs. The tokens of all engines are compared (temperature 0).
"""

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.instrumented import DTYPE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# name -> (tensor_parallel_size, VLLM_CPU_OMP_THREADS_BIND, what it is)
ENGINES = {
    "tp1-1core": (1, "0", "TP=1, 1 thread on core 0"),
    "tp1-2cores": (1, "0-1", "TP=1, 2 threads on cores 0-1"),
    "tp2": (2, "0|1", "TP=2, 1 thread per rank on cores 0 and 1"),
}


def start(model: Path, tp: int, bind: str, max_model_len: int):
    from vllm import LLM

    # Read when the workers are spawned, during construction.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return LLM(model=str(model), max_model_len=max_model_len, max_num_seqs=16,
               tensor_parallel_size=tp, dtype=DTYPE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--caches", default="none,dual")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tp")
    args = parser.parse_args()

    from vllm import SamplingParams

    from dllm_reference.tiny_llada import write_random_model

    t_start = time.perf_counter()
    meta = report.run_metadata()
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(1, 96) for _ in range(args.prompt_len)]}
               for _ in range(args.batch)]
    caches = args.caches.split(",")
    params = {cache: SamplingParams(temperature=0, max_tokens=args.gen_length, ignore_eos=True,
                                    extra_args={"gen_length": args.gen_length,
                                                "block_length": args.block_length,
                                                "steps": args.steps, "cache": cache})
              for cache in caches}
    walls: dict[tuple[str, str], list[float]] = {(e, c): [] for e in ENGINES for c in caches}
    tokens: dict[tuple[str, str], list[list[int]]] = {}
    with tempfile.TemporaryDirectory(prefix="dllm-tp-") as tmp:
        model = write_random_model(Path(tmp) / "model", seed=0, d_model=768, n_layers=4,
                                   n_heads=12, mlp_hidden_size=2048)
        engines = {}
        startup = {}
        for name, (tp, bind, _) in ENGINES.items():
            t = time.perf_counter()
            engines[name] = start(model, tp, bind, args.prompt_len + args.gen_length)
            startup[name] = time.perf_counter() - t
            for cache in caches:  # warm-up, untimed
                engines[name].generate(prompts[:1], params[cache], use_tqdm=False)
        for _ in range(args.repeats):
            for cache in caches:
                for name, llm in engines.items():
                    # Idle workers of the other engines stop spinning after 1 s.
                    time.sleep(2)
                    t = time.perf_counter()
                    outs = llm.generate(prompts, params[cache], use_tqdm=False)
                    walls[name, cache].append(time.perf_counter() - t)
                    tokens[name, cache] = [list(o.outputs[0].token_ids) for o in outs]
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()

    rows = []
    for cache in caches:
        base = statistics.median(walls["tp1-1core", cache])
        for name, (tp, bind, what) in ENGINES.items():
            wall = statistics.median(walls[name, cache])
            rows.append({"engine": name, "description": what, "cache": cache,
                         "wall_s": walls[name, cache], "wall_s_median": wall,
                         "tokens_per_s": args.batch * args.gen_length / wall,
                         "vs_tp1_1core": base / wall,
                         "same_tokens_as_tp1": tokens[name, cache] == tokens["tp1-1core", cache],
                         "startup_s": startup[name]})
    data = {"mode": "tp", "meta": meta, "settings": vars(args) | {"out": str(args.out)},
            "results": rows, "total_seconds": time.perf_counter() - t_start}
    report.write_json(args.out / "tp.json", data)
    load = meta["load_average_at_start"]
    lines = [
        "# Tensor parallelism on 2 CPU cores (overhead)", "",
        f"- Date: {meta['date']}, git `{meta['git']['commit']}`, {meta['cpu']}, "
        f"{meta['cpu_cores']} cores, load average at start {f'{load[0]:.2f}' if load else '?'}",
        f"- Command: `{meta['command']}`; total {data['total_seconds']:.0f} s",
        "", f"Batch {args.batch}, prompt {args.prompt_len}, gen_length {args.gen_length}, "
        f"block {args.block_length}, steps {args.steps}, temperature 0, median of "
        f"{args.repeats}.", "",
        "| cache | engine | wall s | tokens/s | vs TP=1 1 core | same tokens |",
        "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| `{r['cache']}` | {r['description']} | {r['wall_s_median']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['vs_tp1_1core']:.2f}x | "
                     f"{'yes' if r['same_tokens_as_tp1'] else 'no'} |")
    (args.out / "tp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
