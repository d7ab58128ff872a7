"""Per-request decoding parameters: defaults, validation and resolution.

Requests pass them in `SamplingParams.extra_args` (OpenAI: `vllm_xargs`); the
server sets defaults with `--additional-config '{"dllm": {...}}'`. Resolution
happens once, when a request enters the engine, and the resolved values are
written back into `extra_args` so every later stage reads complete parameters.
"""

import math
from dataclasses import asdict, dataclass
from typing import Any

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")

# LLaDA's reference defaults (spec §1.3) except block_length, where the
# README examples' 32 is what semi-autoregressive serving wants. `steps=None`
# means one step per generated token, LLaDA's best-quality setting.
DEFAULTS: dict[str, Any] = {
    "gen_length": 128,
    "block_length": 32,
    "steps": None,
    "remasking": "low_confidence",
    "cache": "none",
}


class ParamError(ValueError):
    """A request or server parameter is invalid; `parameter` names it."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class DllmParams:
    gen_length: int
    block_length: int
    steps: int
    remasking: str
    cache: str = "none"

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @classmethod
    def from_resolved(cls, extra_args: dict[str, Any]) -> "DllmParams":
        return cls(**{name: extra_args[name] for name in DEFAULTS})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ParamError(name, f"{name} must be a positive integer, got {value!r}")
    return value


def _check_known(source: str, values: dict[str, Any]) -> None:
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ParamError(unknown[0], f"unknown {source} parameter {unknown[0]!r}; "
                         f"known: {', '.join(DEFAULTS)}")


def server_defaults(dllm_config: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults for this server: `DEFAULTS` overridden by `--additional-config`'s `dllm`."""
    overrides = dict(dllm_config or {})
    _check_known("dllm server", overrides)
    return {**DEFAULTS, **overrides}


def resolve(
    extra_args: dict[str, Any] | None,
    defaults: dict[str, Any],
    *,
    max_tokens: int | None,
    prompt_len: int,
    max_model_len: int,
) -> DllmParams:
    """Complete and check a request's parameters.

    Without an explicit `gen_length` the canvas is the server default, shrunk to
    `max_tokens` rounded up to whole blocks.
    """
    given = dict(extra_args or {})
    _check_known("request", given)
    merged = {**defaults, **given}

    block_length = _positive_int("block_length", merged["block_length"])
    if "gen_length" in given:
        gen_length = _positive_int("gen_length", given["gen_length"])
    else:
        gen_length = _positive_int("gen_length", merged["gen_length"])
        if max_tokens is not None:
            wanted = math.ceil(max_tokens / block_length) * block_length
            gen_length = min(gen_length, max(wanted, block_length))
    if gen_length % block_length:
        raise ParamError("gen_length", f"gen_length ({gen_length}) must be a multiple "
                         f"of block_length ({block_length})")
    steps = merged["steps"] if merged["steps"] is not None else gen_length
    steps = _positive_int("steps", steps)
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ParamError("steps", f"steps ({steps}) must split evenly over the "
                         f"{num_blocks} blocks of gen_length {gen_length} / "
                         f"block_length {block_length}")
    remasking = merged["remasking"]
    if remasking not in REMASKING:
        raise ParamError("remasking", f"remasking must be one of {', '.join(REMASKING)}, "
                         f"got {remasking!r}")
    cache = merged["cache"]
    if cache not in CACHE_MODES:
        raise ParamError("cache", f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if prompt_len + gen_length > max_model_len:
        raise ParamError("gen_length", f"prompt ({prompt_len} tokens) + gen_length "
                         f"({gen_length}) exceeds max_model_len ({max_model_len})")
    return DllmParams(gen_length, block_length, steps, remasking, cache)
