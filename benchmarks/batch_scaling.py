"""Throughput against batch size, side by side in one run (issue: batched hot path).

In-process through `vllm.LLM`: the same request settings at each batch size, every
batch submitted at once, output tokens per second, and the ratio to batch 1. With
`--serve`, the same through `vllm serve` + `vllm bench serve` (random prompts) at
several concurrencies. A profile of where an iteration's time goes (forward pass vs
the rest of the engine step) comes with each in-process row.

    python -m benchmarks.batch_scaling --out benchmarks/results/batch_scaling [--serve]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer

from benchmarks.instrumented import DTYPE
from dllm_reference import tasks

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "examples" / "llada-tasks"
SETTINGS = {"cache": "dual", "policy": "threshold", "block_length": 8, "gen_length": 32}


def in_process(model: Path, batch_sizes: list[int], repeats: int) -> list[dict]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    problems = tasks.heldout(max(batch_sizes))
    prompts = [{"prompt_token_ids": tokenizer.encode(tasks.render_chat(p.prompt)).ids}
               for p in problems]
    params = SamplingParams(temperature=0.0, max_tokens=SETTINGS["gen_length"], ignore_eos=True,
                            extra_args=dict(SETTINGS))
    llm = LLM(model=str(model), max_num_seqs=max(batch_sizes), dtype=DTYPE,
              max_num_batched_tokens=max(batch_sizes) * 256)
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    forward_time = [0.0]
    original = runner.run_pass

    def timed(*args):
        start = time.perf_counter()
        out = original(*args)
        forward_time[0] += time.perf_counter() - start
        return out

    runner.run_pass = timed
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    work = {"iterations": 0, "rows": 0}
    schedule = scheduler.schedule

    def counted(*a, **k):
        out = schedule(*a, **k)
        if out.total_num_scheduled_tokens:
            work["iterations"] += 1
            work["rows"] += out.total_num_scheduled_tokens
        return out

    scheduler.schedule = counted
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
    rows = []
    for n in batch_sizes:
        best = None
        for _ in range(repeats):
            forward_time[0] = 0.0
            work.update(iterations=0, rows=0)
            start = time.perf_counter()
            outs = llm.generate(prompts[:n], params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            run = {"batch": n, "seconds": elapsed, "output_tokens": tokens,
                   "tokens_per_s": tokens / elapsed, "forward_share": forward_time[0] / elapsed,
                   "iterations": work["iterations"], "rows": work["rows"],
                   "ms_per_iteration": 1e3 * elapsed / work["iterations"],
                   "forward_us_per_row": 1e6 * forward_time[0] / work["rows"]}
            if best is None or run["tokens_per_s"] > best["tokens_per_s"]:
                best = run
        rows.append(best)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_to_batch_1"] = r["tokens_per_s"] / base
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(model: Path, concurrencies: list[int], num_prompts: int) -> list[dict]:
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    defaults = json.dumps({"dllm": SETTINGS})
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--host",
         "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max(concurrencies)),
         "--additional-config", defaults, "--dtype", DTYPE],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        import urllib.request

        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(1)
        else:
            raise RuntimeError("vllm serve did not come up")
        for c in concurrencies:
            result_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{port}-{c}"
            subprocess.run(
                [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
                 "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
                 "--model", str(model), "--dataset-name", "random", "--random-input-len", "32",
                 "--random-output-len", str(SETTINGS["gen_length"]), "--ignore-eos",
                 "--num-prompts", str(num_prompts), "--max-concurrency", str(c),
                 "--save-result", "--result-dir", str(result_dir), "--result-filename", "r.json"],
                env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                timeout=900)
            result = json.loads((result_dir / "r.json").read_text())
            rows.append({"concurrency": c, "tokens_per_s": result["output_throughput"],
                         "completed": result["completed"]})
    finally:
        server.terminate()
        server.wait(timeout=60)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_to_concurrency_1"] = r["tokens_per_s"] / base
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Batch scaling ({report['model']})", "",
             f"Settings: {json.dumps(SETTINGS)}, ignore_eos, temperature 0; "
             f"torch threads {report['threads']}.", "",
             "| batch | output tok/s | x batch 1 | iterations | rows/iteration | ms/iteration "
             "| forward share | forward us/row |", "|---|---|---|---|---|---|---|---|"]
    for r in report["in_process"]:
        lines.append(f"| {r['batch']} | {r['tokens_per_s']:.1f} | {r['ratio_to_batch_1']:.2f} | "
                     f"{r['iterations']} | {r['rows'] / r['iterations']:.0f} | "
                     f"{r['ms_per_iteration']:.2f} | {r['forward_share']:.0%} | "
                     f"{r['forward_us_per_row']:.1f} |")
    if report.get("served"):
        lines += ["", "| concurrency | output tok/s | x concurrency 1 |", "|---|---|---|"]
        for r in report["served"]:
            lines.append(f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | "
                         f"{r['ratio_to_concurrency_1']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/batch_scaling")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help="also run vllm bench serve")
    parser.add_argument("--concurrencies", default="1,4,16,64")
    parser.add_argument("--num-prompts", type=int, default=128)
    args = parser.parse_args(argv)
    import torch

    report = {"model": args.model.name, "threads": torch.get_num_threads(),
              "in_process": in_process(args.model, [int(b) for b in args.batch_sizes.split(",")],
                                       args.repeats)}
    if args.serve:
        report["served"] = served(args.model, [int(c) for c in args.concurrencies.split(",")],
                                  args.num_prompts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_scaling.json").write_text(json.dumps(report, indent=2))
    (args.out / "batch_scaling.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
