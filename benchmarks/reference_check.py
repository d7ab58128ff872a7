"""The reference decoder's answers for a harness configuration, to check the plugin by.

At temperature 0 the plugin must give the answers of tests/reference/generate.py for
the same prompts under any policy (fixed, threshold, factor, frechet), remasking and
cache mode; `harness accuracy --reference NAMES` reports how many do, and the
reference's own accuracy. The reference runs here on the CPU, one prompt at a time.
"""

from pathlib import Path
from typing import Any

import torch

from tests.reference.generate import generate
from tests.reference.modeling import ReferenceLLaDA

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
