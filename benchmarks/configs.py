"""Decoding configurations the harness compares: each is a name plus the request's
`SamplingParams.extra_args` (the plugin's per-request dLLM parameters), nothing else.

    from benchmarks.configs import accuracy_configs, parse_config
    accuracy_configs(gen_length=32, block_length=8)   # the default comparison
    parse_config('thr0.7+dual={"policy": "threshold", "threshold": 0.7, "cache": "dual"}')

Names used in `--configs` select from the defaults; `--config NAME=JSON` adds more.
"""

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DecodeConfig:
    name: str
    extra_args: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def describe(self) -> str:
        """The extra_args as a compact `k=v` list (gen_length/block_length/steps first)."""
        order = ["gen_length", "block_length", "steps"]
        keys = [k for k in order if k in self.extra_args]
        keys += sorted(k for k in self.extra_args if k not in order)
        return " ".join(f"{k}={_fmt(self.extra_args[k])}" for k in keys)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# The accuracy benchmark's canvas on the short suite: its answers fit in 24 characters
# plus <|eot_id|>.
ACCURACY_GEN_LENGTH = 32
# Four blocks of 8, so the prefix and dual caches differ (with a single 32-token block
# both would only cache the prompt).
ACCURACY_BLOCK_LENGTH = 8
# The bundled checkpoints the accuracy benchmark runs by default, with the held-out prompts
# each gets unless --num-prompts says otherwise: a long-answer prompt costs about 7x a short
# one (128-token canvas, four blocks), so 200 of them take ~25 min here, 1000 short ones ~12.
# Each is measured at its served shape (generation_config.json) unless listed in
# MEASURED_SHAPES: the short model serves one block of 32, which would leave nothing
# between the prefix and dual caches.
DEFAULT_MODELS = {"examples/llada-tasks": 1000, "examples/llada-long": 200}
MEASURED_SHAPES = {"examples/llada-tasks": (ACCURACY_GEN_LENGTH, ACCURACY_BLOCK_LENGTH)}


# ES-dLLM's cache schedule in its LLaDA GSM8K runs (arXiv:2603.10088; its eval scripts
# re-encode the prompt every 64 iterations, `prompt_update_freq`).
ES_REFRESH_PERIOD = 64


def accuracy_configs(gen_length: int = ACCURACY_GEN_LENGTH,
                     block_length: int = ACCURACY_BLOCK_LENGTH) -> list[DecodeConfig]:
    """The default comparison. The first one is the baseline the speedups refer to.

    Every configuration names its policy: a model may default to another (SDAR and
    LLaDA2 decode with their threshold rule unless told).
    """
    shape = {"gen_length": gen_length, "block_length": block_length}
    vanilla = {**shape, "steps": gen_length, "remasking": "low_confidence", "cache": "none",
               "policy": "fixed"}
    return [
        DecodeConfig("vanilla", dict(vanilla),
                     "LLaDA: fixed schedule, 1 token per step, no cache"),
        DecodeConfig("prefix", {**vanilla, "cache": "prefix"},
                     "vanilla schedule + Fast-dLLM prefix cache"),
        DecodeConfig("dual", {**vanilla, "cache": "dual"},
                     "vanilla schedule + Fast-dLLM dual cache"),
        DecodeConfig("threshold", {**vanilla, "policy": "threshold", "threshold": 0.9},
                     "Fast-dLLM parallel decoding, confidence >= 0.9"),
        DecodeConfig("threshold0.7", {**vanilla, "policy": "threshold", "threshold": 0.7},
                     "a lower threshold: more tokens per iteration, more risk"),
        DecodeConfig("threshold+dual",
                     {**vanilla, "policy": "threshold", "threshold": 0.9, "cache": "dual"},
                     "Fast-dLLM: threshold 0.9 + dual cache"),
        DecodeConfig("factor", {**vanilla, "policy": "factor", "factor": 1.0},
                     "Fast-dLLM factor rule, f = 1.0"),
        DecodeConfig("frechet", {**vanilla, "policy": "frechet", "frechet_delta": 0.25},
                     "Fast-dLLM++ Frechet rule, delta = 0.25"),
        DecodeConfig("frechet0.02", {**vanilla, "policy": "frechet", "frechet_delta": 0.02},
                     "Frechet rule, delta = 0.02 (the shipped GSM8K script's): commits more"),
        DecodeConfig("threshold+r2", {**vanilla, "policy": "threshold", "threshold": 0.9,
                                      "r2": True},
                     "threshold 0.9 + R2-dLLM rules (defaults)"),
        DecodeConfig("es", {**vanilla, "skip": "es"},
                     "vanilla schedule + ES-dLLM early skipping (defaults)"),
        DecodeConfig("dyllm", {**vanilla, "skip": "dyllm"},
                     "vanilla schedule + DyLLM salient tokens (defaults)"),
        DecodeConfig("dyllm-exact", {**vanilla, "skip": "dyllm", "dyllm_attention": "exact"},
                     "DyLLM with exact attention for every query row"),
        DecodeConfig("threshold+dual+es", {**vanilla, "policy": "threshold", "threshold": 0.9,
                                           "cache": "dual", "skip": "es"},
                     "threshold 0.9 + dual cache + ES-dLLM"),
        DecodeConfig(f"threshold+dual-p{ES_REFRESH_PERIOD}+es",
                     {**vanilla, "policy": "threshold", "threshold": 0.9, "cache": "dual",
                      "refresh_period": ES_REFRESH_PERIOD, "skip": "es"},
                     "threshold 0.9 + dual cache on ES-dLLM's refresh schedule + ES-dLLM"),
        DecodeConfig("threshold+dual+dyllm", {**vanilla, "policy": "threshold",
                                              "threshold": 0.9, "cache": "dual",
                                              "skip": "dyllm"},
                     "threshold 0.9 + dual cache + DyLLM"),
        DecodeConfig("threshold+dual+dyllm-exact", {**vanilla, "policy": "threshold",
                                                    "threshold": 0.9, "cache": "dual",
                                                    "skip": "dyllm", "dyllm_attention": "exact"},
                     "threshold 0.9 + dual cache + DyLLM with exact attention"),
    ]


# The cost benchmark: one schedule, three caches, and token skipping on the dual cache,
# under Fast-dLLM's refresh at each block start and under ES-dLLM's own schedule, with and
# without skipping, so that the schedule's share and the skipping's share of ES-dLLM's
# speed-up both show.
COST_GEN_LENGTH = 256
COST_BLOCK_LENGTH = 32
COST_CACHES = ("none", "prefix", "dual")
COST_SKIPS = {
    "dual+es": {"skip": "es"},
    "dual+dyllm": {"skip": "dyllm"},
    f"dual-p{ES_REFRESH_PERIOD}": {"refresh_period": ES_REFRESH_PERIOD},
    f"dual-p{ES_REFRESH_PERIOD}+es": {"refresh_period": ES_REFRESH_PERIOD, "skip": "es"},
    f"dual-p{ES_REFRESH_PERIOD}+dyllm": {"refresh_period": ES_REFRESH_PERIOD, "skip": "dyllm"},
    # DyLLM with exact attention for every query row: what its approximation saves.
    "dual+dyllm-exact": {"skip": "dyllm", "dyllm_attention": "exact"},
    f"dual-p{ES_REFRESH_PERIOD}+dyllm-exact": {"refresh_period": ES_REFRESH_PERIOD,
                                               "skip": "dyllm", "dyllm_attention": "exact"},
}
# Acceptance targets at gen 256 / block 32: the caches' throughput vs cache "none"
# (issue 4), token skipping's vs "dual" without skipping (issue 11).
COST_TARGETS = {"prefix": 2.0, "dual": 4.0}
COST_SKIP_TARGETS = {"dual+es": 1.6, "dual+dyllm": 1.5, f"dual-p{ES_REFRESH_PERIOD}+es": 1.6,
                     f"dual-p{ES_REFRESH_PERIOD}+dyllm": 1.5}


def cost_configs(gen_length: int = COST_GEN_LENGTH, block_length: int = COST_BLOCK_LENGTH,
                 steps: int | None = None) -> list[DecodeConfig]:
    steps = gen_length if steps is None else steps
    shape = {"gen_length": gen_length, "block_length": block_length, "steps": steps,
             "remasking": "low_confidence"}
    return [DecodeConfig(cache, {**shape, "cache": cache}, f"fixed schedule, cache {cache}")
            for cache in COST_CACHES] + [
        DecodeConfig(name, {**shape, "cache": "dual", **extra},
                     "fixed schedule, cache dual, " + ", ".join(
                         f"{k} {v}" for k, v in extra.items()) + " (other defaults)")
        for name, extra in COST_SKIPS.items()]


def parse_config(spec: str, shape: dict[str, int] | None = None) -> DecodeConfig:
    """`NAME=JSON-object` -> DecodeConfig, e.g. `thr0.8={"policy":"threshold","threshold":0.8}`;
    `shape` (the workload's gen_length / block_length) fills what the object leaves out, so
    a configuration decodes the canvas the other rows do."""
    name, sep, body = spec.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected NAME=JSON, got {spec!r}")
    extra = json.loads(body)
    if not isinstance(extra, dict):
        raise ValueError(f"config {name!r}: extra_args must be a JSON object, got {body!r}")
    return DecodeConfig(name.strip(), {**(shape or {}), **extra}, "user-given")


def names(comma_list: str | None) -> list[str]:
    """The names in a comma list, blanks dropped; None gives none."""
    return [n.strip() for n in (comma_list or "").split(",") if n.strip()]


def select(configs: list[DecodeConfig], comma_list: str | None) -> list[DecodeConfig]:
    """Keep the configs named in a comma list (in the list's order); None keeps all."""
    if not comma_list:
        return configs
    by_name = {c.name: c for c in configs}
    wanted = names(comma_list)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; defaults: {list(by_name)}")
    return [by_name[n] for n in wanted]
