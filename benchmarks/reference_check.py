"""The reference decoder's answers for a harness configuration, to check the plugin by.

At temperature 0 the plugin must give the answers of dllm_reference/generate.py for
the same prompts under any policy (fixed, threshold, factor, frechet), remasking and
cache mode; `harness accuracy --reference NAMES` reports how many do, and the
reference's own accuracy (`check_against_reference`). The reference runs here on the
CPU, one prompt at a time.
"""

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.instrumented import log
from dllm_reference import tasks
from dllm_reference.generate import generate
from dllm_reference.modeling import ReferenceLLaDA

# The resolved request parameters that shape a decode, all of which the reference's
# generate() takes under the same names.
_SCHEDULE_KEYS = ("gen_length", "block_length", "steps", "remasking", "cache", "policy")
# Each parallel policy's own parameter (same name in generate()).
_POLICY_PARAMETER = {"threshold": "threshold", "factor": "factor", "frechet": "frechet_delta"}
# Parameters the reference has no equivalent for, with the value that makes them inert.
_INERT = {"r2": False, "logits_eos_inf": False, "confidence_eos_eot_inf": False}


def reference_settings(resolved: dict[str, Any]) -> dict[str, Any]:
    """generate() keywords for a configuration's resolved extra_args.

    Raises ValueError for a configuration the reference cannot decode (R2 rules or
    EOS rules), naming the parameter.
    """
    for key, inert in _INERT.items():
        if resolved.get(key, inert) != inert:
            raise ValueError(f"the reference decodes only {key}={inert!r}, "
                             f"not {resolved[key]!r}")
    settings = {key: resolved[key] for key in _SCHEDULE_KEYS}
    parameter = _POLICY_PARAMETER.get(settings["policy"])
    if parameter is not None:
        settings[parameter] = resolved[parameter]
    return settings


def decode_with_reference(model_path: str | Path, prompts: list[list[int]],
                          settings: dict[str, Any]) -> list[list[int]]:
    """Greedy canvases (whole, not cut at the end token) of the reference model for
    `prompts` under `settings`."""
    model = ReferenceLLaDA.from_pretrained(Path(model_path)).eval()
    mask_id = model.config["mask_token_id"]
    with torch.inference_mode():
        return [generate(model, prompt, mask_id=mask_id, temperature=0.0, **settings)["tokens"]
                for prompt in prompts]


def check_against_reference(model: Path, prompts: list[list[int]], problems: list[tasks.Problem],
                            answers: list[str], resolved: dict[str, Any],
                            answer_of: Callable[[list[int]], str]) -> dict[str, Any]:
    """Decodes the prompts with the reference under the configuration's resolved
    parameters: its accuracy, and how many of the plugin's `answers` it gives too.
    A configuration the reference cannot decode is reported as skipped."""
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
