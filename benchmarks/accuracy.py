"""`harness accuracy`: decoding configurations side by side on one engine, per model.

Each configuration (a dict of SamplingParams extra_args, see benchmarks/configs.py)
decodes the same held-out prompts of the model's suite of dllm_reference/tasks.py, all
submitted at once. Reported per configuration: accuracy per family, output tokens/s,
model iterations per request (counted at the scheduler), tokens per iteration, speedup
vs the first configuration and peak RSS; a configuration the plugin rejects is reported
as skipped, with the plugin's message.
"""

import argparse
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from benchmarks import configs as cfgs
from benchmarks import report
from benchmarks.eval_reference import answer_text, checkpoint_tasks, stop_ids
from benchmarks.instrumented import BatchResult, Engine, log, model_max_len, sampling_params
from benchmarks.reference_check import check_against_reference
from dllm_reference import tasks

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NUM_PROMPTS = 1000  # per model not in configs.DEFAULT_MODELS, families interleaved


def cut_at_end(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Tokens up to and including the first end token."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


@dataclass
class Workload:
    """One model's held-out prompts, at the shape they are decoded with."""

    model_name: str
    model: Path
    gen_length: int
    block_length: int
    stop_ids: set[int]
    tokenizer: Tokenizer
    problems: list[tasks.Problem]
    prompts: list[list[int]]  # the problems in chat form, as token ids
    families: list[str]  # the suite's families that have prompts, in suite order

    def answer(self, tokens: list[int]) -> str:
        """A canvas's answer text, as it is scored."""
        return answer_text(self.tokenizer, tokens, self.stop_ids)


def load_workload(args: argparse.Namespace, model_name: str) -> Workload:
    """`model_name` (a folder, absolute or under the repository) and its held-out prompts."""
    model = Path(model_name) if Path(model_name).exists() else ROOT / model_name
    # The shape: the flags, else MEASURED_SHAPES, else the checkpoint's own.
    suite, gen_length, block_length = checkpoint_tasks(model)
    gen_length, block_length = cfgs.MEASURED_SHAPES.get(model_name, (gen_length, block_length))
    gen_length, block_length = args.gen_length or gen_length, args.block_length or block_length
    ends = stop_ids(model)
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    num_prompts = args.num_prompts or cfgs.DEFAULT_MODELS.get(model_name, DEFAULT_NUM_PROMPTS)
    problems = tasks.heldout(num_prompts, families=suite)
    prompts = [tokenizer.encode(tasks.render_chat(p.prompt)).ids for p in problems]
    families = [f for f in suite if any(p.family == f for p in problems)]
    return Workload(model_name, model, gen_length, block_length, ends, tokenizer,
                    problems, prompts, families)


def select_configs(args: argparse.Namespace, gen_length: int, block_length: int
                   ) -> tuple[list[cfgs.DecodeConfig], list[str]]:
    """The configurations to run (`--configs` of the defaults, then `--config`) and the
    names `--reference` checks; exits on an empty, ambiguous or unknown choice."""
    configs = cfgs.select(cfgs.accuracy_configs(gen_length, block_length), args.configs)
    shape = {"gen_length": gen_length, "block_length": block_length}
    configs += [cfgs.parse_config(spec, shape) for spec in args.config or []]
    if not configs:
        raise SystemExit("no configurations to run")
    duplicates = sorted({c.name for c in configs if [d.name for d in configs].count(c.name) > 1})
    if duplicates:
        raise SystemExit(f"configuration names must be unique: {duplicates}")

    reference_names = cfgs.names(args.reference)
    unknown = sorted(set(reference_names) - {c.name for c in configs})
    if unknown:
        raise SystemExit(f"--reference names configurations that do not run: {unknown}")
    return configs, reference_names


def warm_up(engine: Engine, configs: list[cfgs.DecodeConfig], prompts: list[list[int]]
            ) -> dict[str, BatchResult]:
    """Untimed: one request per configuration, which also tells which configurations the
    plugin accepts (their results, by name), then a few more requests through the first
    accepted one."""
    checks: dict[str, BatchResult] = {}
    for c in configs:
        checks[c.name] = engine.run([(f"warmup/{c.name}/0", prompts[0],
                                      sampling_params(c.extra_args))])
        if checks[c.name].status != "ok":
            log(f"{c.name}: {checks[c.name].status}: {checks[c.name].error}")
    warm = [c for c in configs if checks[c.name].status == "ok"]
    if warm:
        engine.run([(f"warmup/batch/{i}", p, sampling_params(warm[0].extra_args))
                    for i, p in enumerate(prompts[: min(8, len(prompts))])])
    return checks


@dataclass
class Rounds:
    """The timed batches of every configuration that ran, its peak RSS, and the first
    failure of those that broke off."""

    batches: dict[str, list[BatchResult]] = field(default_factory=lambda: defaultdict(list))
    peaks: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    failed: dict[str, BatchResult] = field(default_factory=dict)


def timed_rounds(engine: Engine, configs: list[cfgs.DecodeConfig], prompts: list[list[int]],
                 repeats: int) -> Rounds:
    """Every configuration once per round, rounds one after the other, so that a change of
    machine load hits all configurations alike. A configuration that fails runs no more."""
    rounds = Rounds()
    for rnd in range(repeats):
        for c in configs:
            if c.name in rounds.failed:
                continue
            log(f"{c.name}" + (f" (round {rnd + 1}/{repeats})" if repeats > 1
                               else "") + f": {c.describe()}")
            report.reset_peak_rss()
            batch = engine.run([(f"{c.name}/{rnd}/{i}", p, sampling_params(c.extra_args))
                                for i, p in enumerate(prompts)])
            rounds.peaks[c.name] = max(rounds.peaks[c.name], report.peak_rss_mb())
            if batch.status != "ok":
                log(f"{c.name}: {batch.status}: {batch.error}")
                rounds.failed[c.name] = batch
                continue
            rounds.batches[c.name].append(batch)
            log(f"{c.name}: {batch.wall_s:.1f} s, load average {batch.load_average}")
    return rounds


def score(name: str, runs: list[BatchResult], work: Workload, peak_rss_mb: float
          ) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    """One configuration's measurements: answers, iterations and rows from its first round,
    the median wall time over all rounds. Returns the entry's fields, the answers in
    prompt order and one sample per prompt."""
    first = runs[0]
    correct: Counter[str] = Counter()
    count: Counter[str] = Counter()
    samples, answers = [], []
    output_tokens = iterations = 0
    latencies = []
    for i, problem in enumerate(work.problems):
        r = first.requests[f"{name}/0/{i}"]
        tokens = cut_at_end(r.token_ids, work.stop_ids)
        answer = work.answer(r.token_ids)
        ok = tasks.score(answer, problem.answer)
        count[problem.family] += 1
        correct[problem.family] += ok
        output_tokens += len(tokens)
        iterations += r.iterations
        latencies.append(r.finished_at)
        answers.append(answer)
        samples.append({"family": problem.family, "prompt": problem.prompt,
                        "gold": problem.answer, "answer": answer, "correct": ok,
                        "tokens": len(tokens), "iterations": r.iterations,
                        "finish_reason": r.finish_reason,
                        "latency_s": round(r.finished_at, 4)})
    n = len(work.problems)
    walls = [b.wall_s for b in runs]
    wall = statistics.median(walls)
    accuracy = {f: correct[f] / count[f] for f in work.families}
    fields = dict(
        status="ok", error="",
        resolved_extra_args=first.resolved_extra_args,
        n=n, correct=dict(correct), accuracy=accuracy,
        accuracy_avg=sum(accuracy.values()) / len(accuracy),
        accuracy_micro=sum(correct.values()) / n,
        wall_s=wall, wall_s_rounds=walls, cpu_s_rounds=[b.cpu_s for b in runs],
        load_average_rounds=[b.load_average for b in runs],
        output_tokens=output_tokens,
        tokens_per_s=output_tokens / wall,
        requests_per_s=n / wall,
        iterations_total=iterations,
        iterations_per_request=iterations / n,
        iterations_max=max(s["iterations"] for s in samples),
        tokens_per_iteration=output_tokens / max(1, iterations),
        model_rows_per_request=None if first.model_rows is None else first.model_rows / n,
        engine_steps=first.engine_steps,
        mean_batch_size=iterations / max(1, first.engine_steps),
        latency_mean_s=statistics.fmean(latencies),
        latency_p50_s=statistics.median(latencies),
        latency_max_s=max(latencies),
        peak_rss_mb=peak_rss_mb,
    )
    return fields, answers, samples


def compare_to_baseline(entry: dict[str, Any], answers: list[str], baseline: dict[str, Any],
                        baseline_answers: list[str]) -> None:
    """Adds the speedup, iteration and compute reductions and the share of answers equal
    to the baseline's."""
    entry["speedup"] = entry["tokens_per_s"] / baseline["tokens_per_s"]
    entry["iteration_reduction"] = (baseline["iterations_per_request"]
                                    / entry["iterations_per_request"])
    entry["compute_reduction"] = (
        baseline["model_rows_per_request"] / entry["model_rows_per_request"]
        if entry["model_rows_per_request"] and baseline["model_rows_per_request"] else None)
    entry["same_as_baseline"] = (sum(a == b for a, b in zip(answers, baseline_answers))
                                 / len(answers))


def run_accuracy(args: argparse.Namespace, model_name: str) -> dict[str, Any]:
    """One model's accuracy run, as the JSON `report.render` takes."""
    t_start = time.perf_counter()
    work = load_workload(args, model_name)
    configs, reference_names = select_configs(args, work.gen_length, work.block_length)

    meta = report.run_metadata()
    max_model_len = model_max_len(work.model, args.max_model_len)
    log(f"model {work.model}, {len(work.problems)} prompts, {len(configs)} configurations, "
        f"max_model_len {max_model_len}")
    engine = Engine(work.model, max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
                    threads=args.threads)
    startup_s = time.perf_counter() - t_start
    log(f"engine ready in {startup_s:.1f} s")

    checks = warm_up(engine, configs, work.prompts)
    rounds = timed_rounds(engine, [c for c in configs if checks[c.name].status == "ok"],
                          work.prompts, args.repeats)

    # The first configuration that ran is the baseline the others are compared with.
    results: list[dict] = []
    baseline: dict | None = None
    baseline_answers: list[str] | None = None
    for c in configs:
        entry: dict[str, Any] = {"name": c.name, "description": c.describe(), "note": c.note,
                                 "extra_args": c.extra_args}
        bad = rounds.failed.get(c.name) or (checks[c.name] if checks[c.name].status != "ok"
                                            else None)
        if bad is not None:
            entry.update(status=bad.status, error=bad.error)
            results.append(entry)
            continue
        fields, answers, samples = score(c.name, rounds.batches[c.name], work,
                                         rounds.peaks[c.name])
        entry.update(fields)
        if baseline is None:
            baseline, baseline_answers = entry, answers
        compare_to_baseline(entry, answers, baseline, baseline_answers)
        entry["samples"] = samples if args.save_samples else samples[: len(work.families) * 2]
        log(f"{c.name}: acc {entry['accuracy_avg']:.1%}, {entry['tokens_per_s']:.1f} tok/s, "
            f"{entry['iterations_per_request']:.2f} iters/req")
        if c.name in reference_names:
            entry["reference"] = check_against_reference(
                work.model, work.prompts, work.problems, answers, entry["resolved_extra_args"],
                work.answer)
        results.append(entry)

    return {
        "mode": "accuracy",
        "meta": meta,
        "settings": {
            "model": model_name, "num_prompts": len(work.problems),
            "prompts_per_family": {f: sum(p.family == f for p in work.problems)
                                   for f in work.families},
            "families": work.families, "gen_length": work.gen_length,
            "block_length": work.block_length, "max_model_len": max_model_len,
            "max_num_seqs": args.max_num_seqs, "temperature": 0.0,
            "repeats": args.repeats, "threads": engine.threads,
            "stop_ids": sorted(work.stop_ids),
        },
        "engine_startup_s": startup_s,
        "lifetime_peak_rss_mb": report.lifetime_peak_rss_mb(),
        "results": results,
        "total_seconds": time.perf_counter() - t_start,
    }
