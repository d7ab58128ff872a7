"""Benchmark harness for vllm-dllm: decoding configurations side by side on one engine.

    python -m benchmarks.harness accuracy [--model examples/llada-tasks,examples/llada-long]
                                          [--num-prompts 1000] [--configs vanilla,dual,...]
                                          [--config NAME=JSON] [--out benchmarks/results/accuracy]
    python -m benchmarks.harness cost [--d-model 768 --n-layers 4 --steps 256 ...] [--out DIR]

accuracy: per model (both bundled checkpoints by default, one after the other), one
  in-process vLLM engine; each configuration (a dict of SamplingParams extra_args, see
  benchmarks/configs.py) decodes the same held-out prompts of the model's suite of
  benchmarks/tasks.py, all submitted at once. Reports accuracy per family, output
  tokens/s, model iterations per request (counted at the scheduler), tokens per
  iteration, speedup vs the first configuration and peak RSS. A configuration the
  plugin rejects is reported as skipped, with the plugin's message.
cost: a random-weight LLaDA big enough to be compute-bound, one request at a time,
  gen_length 256 / block 32 with cache none, prefix and dual: wall time per request,
  tokens/s and the ratio vs none (issue 4: dual >= 4x, prefix >= 2x).

Each mode writes <mode>.json, <mode>.md and <mode>.png into --out (accuracy: into
--out/<model folder name>/ when several models run).
"""

import os

# Before vLLM is imported anywhere: a small KV cache, quiet logs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks import configs as cfgs  # noqa: E402
from benchmarks import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NUM_PROMPTS = 1000  # per model not in configs.DEFAULT_MODELS, families interleaved


def log(msg: str) -> None:
    print(f"[harness {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- engine

@dataclass
class RequestResult:
    token_ids: list[int]
    finish_reason: str | None
    finished_at: float  # seconds after the batch was submitted
    iterations: int


@dataclass
class BatchResult:
    status: str = "ok"  # ok | skipped (rejected at admission) | failed (error while running)
    error: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time (user + system) over the batch
    engine_steps: int = 0
    model_rows: int | None = None  # token positions run through the model, all requests
    load_average: float | None = None  # 1-minute load average when the batch started
    requests: dict[str, RequestResult] = field(default_factory=dict)
    resolved_extra_args: dict[str, Any] | None = None


class Engine:
    """An in-process vLLM engine whose scheduler is watched, so that every request's
    model iterations (engine steps that scheduled it) can be counted.

    It also counts the token positions the model runner recomputes (what the KV cache
    modes save), by wrapping the runner's `recompute_range`; if the plugin's internals
    change so that this is impossible, `model_rows` is None and the rest still works.
    """

    def __init__(self, model: str | Path, *, max_model_len: int, max_num_seqs: int,
                 threads: int = 0, seed: int = 0):
        # The engine core must run in this process for the scheduler to be reachable.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch
        from vllm import LLM

        if threads > 0:
            # Before the worker starts: vLLM's CPU worker forbids changing it afterwards.
            torch.set_num_threads(threads)

        self.llm = LLM(model=str(model), max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, seed=seed)
        self.engine = self.llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.iterations: Counter[str] = Counter()
        self.resolved: dict[str, dict] = {}
        self.steps = 0
        original = self.scheduler.schedule

        def schedule(*args, **kwargs):
            out = original(*args, **kwargs)
            if out.num_scheduled_tokens:
                self.steps += 1
            # The scheduler charges each request the rows it recomputes.
            self.rows += out.total_num_scheduled_tokens
            for request_id in out.num_scheduled_tokens:
                external = request_id.rsplit("-", 1)[0]  # vLLM appends "-<8 chars>"
                self.iterations[external] += 1
                if external not in self.resolved:
                    request = self.scheduler.requests.get(request_id)
                    if request is not None and request.sampling_params is not None:
                        self.resolved[external] = dict(request.sampling_params.extra_args or {})
            return out

        self.scheduler.schedule = schedule
        self.rows = 0
        self.threads = torch.get_num_threads()

    def layer_rows(self) -> list[int] | None:
        """Query rows, then FFN rows, the model runner computed per layer so far (None
        if it cannot be read)."""
        try:
            worker = self.engine.engine_core.engine_core.model_executor.driver_worker.worker
            runner = worker.model_runner
            return list(runner.layer_rows) + list(runner.layer_ffn_rows)
        except AttributeError:
            return None

    def run(self, requests: list[tuple[str, list[int], Any]]) -> BatchResult:
        """Submit every (request_id, prompt_token_ids, SamplingParams) at once and step
        the engine until all have finished."""
        result = BatchResult()
        steps_before, rows_before = self.steps, self.rows
        added: list[str] = []
        result.load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        cpu_start = time.process_time()
        start = time.perf_counter()
        try:
            for request_id, prompt, params in requests:
                self.engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
                added.append(request_id)
        except Exception as e:  # noqa: BLE001 - the plugin's validation error, reported
            self._abort(added)
            result.status = "skipped" if not added else "failed"
            result.error = f"{type(e).__name__}: {e}"
            return result
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        completion = out.outputs[0]
                        result.requests[out.request_id] = RequestResult(
                            list(completion.token_ids), completion.finish_reason,
                            time.perf_counter() - start, 0)
        except Exception as e:  # noqa: BLE001 - keep the other configurations running
            self._abort([r for r in added if r not in result.requests])
            result.status = "failed"
            result.error = f"{type(e).__name__}: {e}"
            return result
        result.wall_s = time.perf_counter() - start
        result.cpu_s = time.process_time() - cpu_start
        result.engine_steps = self.steps - steps_before
        if self.rows > rows_before:
            result.model_rows = self.rows - rows_before
        for request_id, r in result.requests.items():
            r.iterations = self.iterations[request_id]
        if requests:
            result.resolved_extra_args = self.resolved.get(requests[0][0])
        return result

    def _abort(self, request_ids: list[str]) -> None:
        if request_ids:
            try:
                self.engine.abort_request(request_ids)
                while self.engine.has_unfinished_requests():
                    self.engine.step()
            except Exception:  # noqa: BLE001
                pass


def sampling_params(extra_args: dict, *, ignore_eos: bool = False):
    from vllm import SamplingParams

    gen_length = extra_args.get("gen_length", cfgs.ACCURACY_GEN_LENGTH)
    return SamplingParams(temperature=0.0, max_tokens=gen_length, ignore_eos=ignore_eos,
                          extra_args=dict(extra_args))


def model_max_len(model: Path, wanted: int | None) -> int:
    config = json.loads((model / "config.json").read_text())
    limit = int(config.get("max_sequence_length", 4096))
    return min(limit, wanted) if wanted else min(limit, 1024)


# --------------------------------------------------------------------------- accuracy

def cut_at_end(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Tokens up to and including the first end token."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


def run_accuracy(args, model_name: str) -> dict:
    from tokenizers import Tokenizer

    from benchmarks import tasks
    from benchmarks.eval_reference import answer_text, checkpoint_tasks

    t_start = time.perf_counter()
    model = Path(model_name) if Path(model_name).exists() else ROOT / model_name
    # The shape: the flags, else MEASURED_SHAPES, else the checkpoint's own.
    suite, gen_length, block_length = checkpoint_tasks(model)
    gen_length, block_length = cfgs.MEASURED_SHAPES.get(model_name, (gen_length, block_length))
    gen_length, block_length = args.gen_length or gen_length, args.block_length or block_length
    model_config = json.loads((model / "config.json").read_text())
    stop_ids = {model_config["eos_token_id"], model_config.get("eot_token_id",
                                                               model_config["eos_token_id"])}
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    num_prompts = args.num_prompts or cfgs.DEFAULT_MODELS.get(model_name, DEFAULT_NUM_PROMPTS)
    problems = tasks.heldout(num_prompts, families=suite)
    prompts = [tokenizer.encode(tasks.render_chat(p.prompt)).ids for p in problems]
    families = [f for f in suite if any(p.family == f for p in problems)]

    configs = cfgs.select(cfgs.accuracy_configs(gen_length, block_length), args.configs)
    configs += [cfgs.parse_config(spec) for spec in args.config or []]
    if not configs:
        raise SystemExit("no configurations to run")
    duplicates = sorted({c.name for c in configs if [d.name for d in configs].count(c.name) > 1})
    if duplicates:
        raise SystemExit(f"configuration names must be unique: {duplicates}")

    reference_names = cfgs.names(args.reference)
    unknown = sorted(set(reference_names) - {c.name for c in configs})
    if unknown:
        raise SystemExit(f"--reference names configurations that do not run: {unknown}")

    meta = report.run_metadata()
    max_model_len = model_max_len(model, args.max_model_len)
    log(f"model {model}, {len(problems)} prompts, {len(configs)} configurations, "
        f"max_model_len {max_model_len}")
    engine = Engine(model, max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
                    threads=args.threads)
    startup_s = time.perf_counter() - t_start
    log(f"engine ready in {startup_s:.1f} s")

    # Warm-up, untimed: one request per configuration, which also tells which
    # configurations the plugin accepts.
    checks: dict[str, BatchResult] = {}
    for c in configs:
        checks[c.name] = engine.run([(f"warmup/{c.name}/0", prompts[0],
                                      sampling_params(c.extra_args))])
        if checks[c.name].status != "ok":
            log(f"{c.name}: {checks[c.name].status}: {checks[c.name].error}")
    warm = [c for c in configs if checks[c.name].status == "ok"]
    if warm:  # a few more requests through the first accepted configuration
        engine.run([(f"warmup/batch/{i}", p, sampling_params(warm[0].extra_args))
                    for i, p in enumerate(prompts[: min(8, len(prompts))])])

    # Timed batches: every configuration once per round, rounds one after the other, so
    # that a change of machine load hits all configurations alike.
    runnable = [c for c in configs if checks[c.name].status == "ok"]
    batches: dict[str, list[BatchResult]] = defaultdict(list)
    peaks: dict[str, float] = defaultdict(float)
    failed: dict[str, BatchResult] = {}
    for rnd in range(args.repeats):
        for c in runnable:
            if c.name in failed:
                continue
            log(f"{c.name}" + (f" (round {rnd + 1}/{args.repeats})" if args.repeats > 1
                               else "") + f": {c.describe()}")
            report.reset_peak_rss()
            batch = engine.run([(f"{c.name}/{rnd}/{i}", p, sampling_params(c.extra_args))
                                for i, p in enumerate(prompts)])
            peaks[c.name] = max(peaks[c.name], report.peak_rss_mb())
            if batch.status != "ok":
                log(f"{c.name}: {batch.status}: {batch.error}")
                failed[c.name] = batch
                continue
            batches[c.name].append(batch)
            log(f"{c.name}: {batch.wall_s:.1f} s, load average {batch.load_average}")

    results: list[dict] = []
    baseline: dict | None = None
    baseline_answers: list[str] | None = None
    for c in configs:
        entry: dict[str, Any] = {"name": c.name, "description": c.describe(), "note": c.note,
                                 "extra_args": c.extra_args}
        bad = failed.get(c.name) or (checks[c.name] if checks[c.name].status != "ok" else None)
        if bad is not None:
            entry.update(status=bad.status, error=bad.error)
            results.append(entry)
            continue
        runs = batches[c.name]
        first = runs[0]  # answers, iterations and rows come from the first round
        ids = [f"{c.name}/0/{i}" for i in range(len(prompts))]
        correct: Counter[str] = Counter()
        count: Counter[str] = Counter()
        samples, answers = [], []
        output_tokens = iterations = 0
        latencies = []
        for rid, problem in zip(ids, problems):
            r = first.requests[rid]
            tokens = cut_at_end(r.token_ids, stop_ids)
            answer = answer_text(tokenizer, r.token_ids, stop_ids)
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
        n = len(problems)
        walls = [b.wall_s for b in runs]
        wall = statistics.median(walls)
        accuracy = {f: correct[f] / count[f] for f in families}
        entry.update(
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
            peak_rss_mb=peaks[c.name],
        )
        if baseline is None:
            baseline, baseline_answers = entry, answers
        entry["speedup"] = entry["tokens_per_s"] / baseline["tokens_per_s"]
        entry["iteration_reduction"] = (baseline["iterations_per_request"]
                                        / entry["iterations_per_request"])
        entry["compute_reduction"] = (
            baseline["model_rows_per_request"] / entry["model_rows_per_request"]
            if entry["model_rows_per_request"] and baseline["model_rows_per_request"] else None)
        entry["same_as_baseline"] = sum(a == b for a, b in zip(answers, baseline_answers)) / n
        entry["samples"] = samples if args.save_samples else samples[: len(families) * 2]
        log(f"{c.name}: acc {entry['accuracy_avg']:.1%}, {entry['tokens_per_s']:.1f} tok/s, "
            f"{entry['iterations_per_request']:.2f} iters/req")
        if c.name in reference_names:
            entry["reference"] = check_against_reference(
                model, prompts, problems, answers, entry["resolved_extra_args"],
                lambda tokens: answer_text(tokenizer, tokens, stop_ids))
        results.append(entry)

    return {
        "mode": "accuracy",
        "meta": meta,
        "settings": {
            "model": model_name, "num_prompts": len(problems),
            "prompts_per_family": {f: sum(p.family == f for p in problems) for f in families},
            "families": families, "gen_length": gen_length,
            "block_length": block_length, "max_model_len": max_model_len,
            "max_num_seqs": args.max_num_seqs, "temperature": 0.0,
            "repeats": args.repeats, "threads": engine.threads,
            "stop_ids": sorted(stop_ids),
        },
        "engine_startup_s": startup_s,
        "lifetime_peak_rss_mb": report.lifetime_peak_rss_mb(),
        "results": results,
        "total_seconds": time.perf_counter() - t_start,
    }


def check_against_reference(model: Path, prompts: list[list[int]], problems: list,
                            answers: list[str], resolved: dict[str, Any],
                            answer_of: Callable[[list[int]], str]) -> dict[str, Any]:
    """Decodes the prompts with the reference under the configuration's resolved
    parameters: its accuracy, and how many of the plugin's answers it gives too."""
    from benchmarks import tasks
    from benchmarks.reference_check import decode_with_reference, reference_settings

    try:
        settings = reference_settings(resolved)
    except ValueError as e:
        return {"status": "skipped", "error": str(e)}
    log(f"reference decode of {len(prompts)} prompts: {settings}")
    t0 = time.perf_counter()
    reference = [answer_of(tokens) for tokens in decode_with_reference(model, prompts, settings)]
    correct: Counter[str] = Counter(p.family for p, a in zip(problems, reference)
                                    if tasks.score(a, p.answer))
    count = Counter(p.family for p in problems)
    accuracy = {f: correct[f] / n for f, n in count.items()}
    accuracy_avg = sum(accuracy.values()) / len(accuracy)
    same = sum(a == b for a, b in zip(answers, reference))
    log(f"reference: acc {accuracy_avg:.1%}, {same}/{len(prompts)} answers identical "
        "to the plugin's")
    return {"status": "ok", "settings": settings, "accuracy": accuracy,
            "accuracy_avg": accuracy_avg,
            "identical_answers": same / len(prompts),
            "differing": [{"prompt": p.prompt, "plugin": a, "reference": b}
                          for p, a, b in zip(problems, answers, reference) if a != b][:10],
            "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- cost

def parameter_count(d_model: int, n_layers: int, mlp: int, vocab: int) -> int:
    return n_layers * (4 * d_model * d_model + 3 * d_model * mlp + 2 * d_model) \
        + 2 * vocab * d_model + d_model


def run_cost(args) -> dict:
    from tests.models.tiny_llada import write_random_model

    t_start = time.perf_counter()
    meta = report.run_metadata()
    if args.d_model % args.head_dim:
        raise SystemExit("--d-model must be a multiple of --head-dim")
    n_heads = args.d_model // args.head_dim
    prompt_len, gen = args.prompt_len, args.gen_length
    max_model_len = prompt_len + gen
    configs = cfgs.select(cfgs.cost_configs(gen, args.block_length, args.steps), args.configs)
    with tempfile.TemporaryDirectory(prefix="dllm-cost-") as tmp:
        if args.model:
            model = Path(args.model)
            cfg = json.loads((model / "config.json").read_text())
        else:
            model = write_random_model(
                Path(tmp) / "model", seed=0, d_model=args.d_model, n_layers=args.n_layers,
                n_heads=n_heads, mlp_hidden_size=args.mlp_hidden_size,
                max_sequence_length=max(1024, max_model_len))
            cfg = json.loads((model / "config.json").read_text())
        shape = {k: cfg[k] for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size",
                                     "vocab_size")}
        shape["parameters_m"] = parameter_count(cfg["d_model"], cfg["n_layers"],
                                                cfg["mlp_hidden_size"], cfg["vocab_size"]) / 1e6
        log(f"cost model {shape}, prompt {prompt_len}, gen {gen}, block {args.block_length}, "
            f"steps {args.steps or gen}")
        engine = Engine(model, max_model_len=max_model_len, max_num_seqs=args.batch,
                        threads=args.threads)
        startup_s = time.perf_counter() - t_start
        rng = random.Random(0)
        prompts = [[rng.randrange(1, 96) for _ in range(prompt_len)]  # printable characters
                   for _ in range(args.batch)]
        prompt = prompts[0]

        # Warm-up, untimed: every cache mode, one step per block.
        checks = {}
        for c in configs:
            warm_args = {**c.extra_args, "steps": gen // args.block_length}
            checks[c.name] = engine.run([(f"warmup/{c.name}", prompt,
                                          sampling_params(warm_args, ignore_eos=True))])
            if checks[c.name].status != "ok":
                log(f"{c.name}: {checks[c.name].status}: {checks[c.name].error}")

        walls: dict[str, list[float]] = defaultdict(list)
        iters: dict[str, list[int]] = defaultdict(list)
        tokens: dict[str, list[int]] = defaultdict(list)
        rows: dict[str, int | None] = {}
        layer_rows: dict[str, list[int] | None] = {}
        cpu: dict[str, list[float]] = defaultdict(list)
        loads: dict[str, list[float | None]] = defaultdict(list)
        errors: dict[str, str] = {}
        peaks: dict[str, float] = defaultdict(float)
        for rep in range(args.repeats):  # methods interleaved, so load drifts hit all alike
            for c in configs:
                if checks[c.name].status != "ok" or c.name in errors:
                    continue
                report.reset_peak_rss()
                before = engine.layer_rows()
                batch = engine.run([(f"{c.name}/{rep}/{i}", p,
                                     sampling_params(c.extra_args, ignore_eos=True))
                                    for i, p in enumerate(prompts)])
                after = engine.layer_rows()
                layer_rows[c.name] = (None if before is None else
                                      [(a - b) // args.batch for a, b in zip(after, before)])
                peaks[c.name] = max(peaks[c.name], report.peak_rss_mb())
                if batch.status != "ok":
                    errors[c.name] = batch.error
                    log(f"{c.name}: {batch.status}: {batch.error}")
                    continue
                done = list(batch.requests.values())
                walls[c.name].append(batch.wall_s)
                iters[c.name].append(max(r.iterations for r in done))
                tokens[c.name].append(sum(len(r.token_ids) for r in done))
                rows[c.name] = batch.model_rows and batch.model_rows // args.batch
                cpu[c.name].append(batch.cpu_s)
                loads[c.name].append(batch.load_average)
                log(f"{c.name} #{rep}: {batch.wall_s:.2f} s, {iters[c.name][-1]} iterations, "
                    f"{tokens[c.name][-1]} tokens")

    results = []
    base_tps = base_rows = dual_tps = None
    for c in configs:
        entry: dict[str, Any] = {"name": c.name, "description": c.describe(),
                                 "extra_args": c.extra_args}
        if checks[c.name].status != "ok" or c.name in errors:
            entry.update(status=checks[c.name].status if checks[c.name].status != "ok"
                         else "failed", error=errors.get(c.name, checks[c.name].error))
            results.append(entry)
            continue
        wall = statistics.median(walls[c.name])
        tps = statistics.median(tokens[c.name]) / wall
        if c.name == "none":
            base_tps, base_rows = tps, rows[c.name]
        if c.name == "dual":
            dual_tps = tps
        entry.update(layer_rows_per_request=layer_rows.get(c.name),
                     skip_target=cfgs.COST_SKIP_TARGETS.get(c.name))
        entry.update(status="ok", error="", wall_s=walls[c.name], wall_s_median=wall,
                     tokens=tokens[c.name][0], iterations=iters[c.name][0],
                     tokens_per_s=tps, peak_rss_mb=peaks[c.name], cpu_s=cpu[c.name],
                     load_average=loads[c.name], model_rows_per_request=rows[c.name],
                     target=cfgs.COST_TARGETS.get(c.name))
        results.append(entry)
    for entry in results:
        if entry["status"] == "ok" and base_tps:
            entry["ratio"] = entry["tokens_per_s"] / base_tps
        if entry["status"] == "ok" and dual_tps:
            entry["ratio_vs_dual"] = entry["tokens_per_s"] / dual_tps
        if entry["status"] == "ok" and base_rows and entry["model_rows_per_request"]:
            entry["compute_reduction"] = base_rows / entry["model_rows_per_request"]
    return {
        "mode": "cost",
        "meta": meta,
        "settings": {"model": str(args.model or "random (temporary folder)"),
                     "model_shape": shape, "prompt_len": prompt_len, "gen_length": gen,
                     "block_length": args.block_length, "steps": args.steps or gen,
                     "repeats": args.repeats, "max_model_len": max_model_len,
                     "batch": args.batch,
                     "threads": engine.threads},
        "engine_startup_s": startup_s,
        "results": results,
        "total_seconds": time.perf_counter() - t_start,
    }


# --------------------------------------------------------------------------- CLI

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
                          "the reference (tests/reference, one prompt at a time): its accuracy "
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
