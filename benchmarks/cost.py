"""`harness cost`: what the KV cache modes (and token skipping) cost on a compute-bound model.

A random-weight LLaDA big enough to be compute-bound (or `--model`), `--batch` requests
with random prompts at a time, gen_length 256 / block 32 by default, every configuration
of `configs.cost_configs`: wall time per batch, tokens/s, the ratio vs cache `none` (issue
4's targets: dual >= 4x, prefix >= 2x) and, for token skipping, vs `dual` (issue 11's),
and the rows the model computed per request, in all and per layer.
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import configs as cfgs
from benchmarks import report
from benchmarks.instrumented import BatchResult, Engine, log, sampling_params
from dllm_reference.tiny_llada import write_random_model


def parameter_count(d_model: int, n_layers: int, mlp: int, vocab: int) -> int:
    return n_layers * (4 * d_model * d_model + 3 * d_model * mlp + 2 * d_model) \
        + 2 * vocab * d_model + d_model


def cost_model(args: argparse.Namespace, folder: Path) -> tuple[Path, dict[str, Any]]:
    """`--model`, else a random LLaDA of the flags' shape written into `folder`, and its
    shape (with the parameter count in millions)."""
    if args.model:
        model = Path(args.model)
    else:
        model = write_random_model(
            folder / "model", seed=0, d_model=args.d_model, n_layers=args.n_layers,
            n_heads=args.d_model // args.head_dim, mlp_hidden_size=args.mlp_hidden_size,
            max_sequence_length=max(1024, args.prompt_len + args.gen_length))
    cfg = json.loads((model / "config.json").read_text())
    shape = {k: cfg[k] for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size",
                                 "vocab_size")}
    shape["parameters_m"] = parameter_count(cfg["d_model"], cfg["n_layers"],
                                            cfg["mlp_hidden_size"], cfg["vocab_size"]) / 1e6
    return model, shape


def warm_up(engine: Engine, configs: list[cfgs.DecodeConfig], prompt: list[int],
            gen_length: int, block_length: int) -> dict[str, BatchResult]:
    """Untimed: every configuration once, one step per block; tells which ones the plugin
    accepts."""
    checks = {}
    for c in configs:
        warm_args = {**c.extra_args, "steps": gen_length // block_length}
        checks[c.name] = engine.run([(f"warmup/{c.name}", prompt,
                                      sampling_params(warm_args, ignore_eos=True))])
        if checks[c.name].status != "ok":
            log(f"{c.name}: {checks[c.name].status}: {checks[c.name].error}")
    return checks


@dataclass
class Measurements:
    """Per configuration name: one entry per repeat (walls, iters, tokens, cpu, loads), or
    the last repeat's (rows, layer_rows: per request), the peak RSS, and the error that
    stopped it."""

    walls: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    iters: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    rows: dict[str, int | None] = field(default_factory=dict)
    layer_rows: dict[str, dict[str, list[int]] | None] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    loads: dict[str, list[float | None]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, str] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def measure(engine: Engine, configs: list[cfgs.DecodeConfig], checks: dict[str, BatchResult],
            prompts: list[list[int]], repeats: int) -> Measurements:
    """The accepted configurations, interleaved in every repeat so that load drifts hit all
    alike; one that fails runs no more."""
    m = Measurements()
    batch_size = len(prompts)
    for rep in range(repeats):
        for c in configs:
            if checks[c.name].status != "ok" or c.name in m.errors:
                continue
            report.reset_peak_rss()
            before = engine.layer_rows()
            batch = engine.run([(f"{c.name}/{rep}/{i}", p,
                                 sampling_params(c.extra_args, ignore_eos=True))
                                for i, p in enumerate(prompts)])
            after = engine.layer_rows()
            m.layer_rows[c.name] = (None if before is None else {
                kind: [(a - b) // batch_size for a, b in zip(after[kind], before[kind])]
                for kind in after})
            m.peaks[c.name] = max(m.peaks[c.name], report.peak_rss_mb())
            if batch.status != "ok":
                m.errors[c.name] = batch.error
                log(f"{c.name}: {batch.status}: {batch.error}")
                continue
            done = list(batch.requests.values())
            m.walls[c.name].append(batch.wall_s)
            m.iters[c.name].append(max(r.iterations for r in done))
            m.tokens[c.name].append(sum(len(r.token_ids) for r in done))
            m.rows[c.name] = batch.model_rows and batch.model_rows // batch_size
            m.cpu[c.name].append(batch.cpu_s)
            m.loads[c.name].append(batch.load_average)
            log(f"{c.name} #{rep}: {batch.wall_s:.2f} s, {m.iters[c.name][-1]} iterations, "
                f"{m.tokens[c.name][-1]} tokens")
    return m


def results(configs: list[cfgs.DecodeConfig], checks: dict[str, BatchResult],
            m: Measurements) -> list[dict[str, Any]]:
    """One entry per configuration, with its ratios to cache `none` and to `dual` when
    those ran."""
    entries = []
    base_tps = base_rows = dual_tps = None
    for c in configs:
        entry: dict[str, Any] = {"name": c.name, "description": c.describe(),
                                 "extra_args": c.extra_args}
        if checks[c.name].status != "ok" or c.name in m.errors:
            entry.update(status=checks[c.name].status if checks[c.name].status != "ok"
                         else "failed", error=m.errors.get(c.name, checks[c.name].error))
            entries.append(entry)
            continue
        wall = statistics.median(m.walls[c.name])
        tps = statistics.median(m.tokens[c.name]) / wall
        if c.name == "none":
            base_tps, base_rows = tps, m.rows[c.name]
        if c.name == "dual":
            dual_tps = tps
        entry.update(layer_rows_per_request=m.layer_rows.get(c.name),
                     skip_target=cfgs.COST_SKIP_TARGETS.get(c.name))
        entry.update(status="ok", error="", wall_s=m.walls[c.name], wall_s_median=wall,
                     tokens=m.tokens[c.name][0], iterations=m.iters[c.name][0],
                     tokens_per_s=tps, peak_rss_mb=m.peaks[c.name], cpu_s=m.cpu[c.name],
                     load_average=m.loads[c.name], model_rows_per_request=m.rows[c.name],
                     target=cfgs.COST_TARGETS.get(c.name))
        entries.append(entry)
    for entry in entries:
        if entry["status"] == "ok" and base_tps:
            entry["ratio"] = entry["tokens_per_s"] / base_tps
        if entry["status"] == "ok" and dual_tps:
            entry["ratio_vs_dual"] = entry["tokens_per_s"] / dual_tps
        if entry["status"] == "ok" and base_rows and entry["model_rows_per_request"]:
            entry["compute_reduction"] = base_rows / entry["model_rows_per_request"]
    return entries


def run_cost(args: argparse.Namespace) -> dict[str, Any]:
    """The cost run, as the JSON `report.render` takes."""
    t_start = time.perf_counter()
    meta = report.run_metadata()
    if args.d_model % args.head_dim:
        raise SystemExit("--d-model must be a multiple of --head-dim")
    prompt_len, gen = args.prompt_len, args.gen_length
    max_model_len = prompt_len + gen
    configs = cfgs.select(cfgs.cost_configs(gen, args.block_length, args.steps), args.configs)
    # The random model's folder lives as long as the engine that reads it.
    with tempfile.TemporaryDirectory(prefix="dllm-cost-") as tmp:
        model, shape = cost_model(args, Path(tmp))
        log(f"cost model {shape}, prompt {prompt_len}, gen {gen}, block {args.block_length}, "
            f"steps {args.steps or gen}")
        engine = Engine(model, max_model_len=max_model_len, max_num_seqs=args.batch,
                        threads=args.threads)
        startup_s = time.perf_counter() - t_start
        rng = random.Random(0)
        prompts = [[rng.randrange(1, 96) for _ in range(prompt_len)]  # printable characters
                   for _ in range(args.batch)]
        checks = warm_up(engine, configs, prompts[0], gen, args.block_length)
        measurements = measure(engine, configs, checks, prompts, args.repeats)

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
        "results": results(configs, checks, measurements),
        "total_seconds": time.perf_counter() - t_start,
    }
