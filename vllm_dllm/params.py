"""Per-request decoding parameters: defaults, validation and resolution.

Requests pass them in `SamplingParams.extra_args` (OpenAI: `vllm_xargs`); the
server sets defaults with `--additional-config '{"dllm": {...}}'`. Resolution
happens once, when a request enters the engine, and the resolved values are
written back into `extra_args` so every later stage reads complete parameters.
"""

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

from vllm_dllm.sampling import dream, policies
from vllm_dllm.sampling import r2 as r2_rules
from vllm_dllm.skipping import dyllm, es

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")
SKIP_MODES = ("none", "es", "dyllm")
# How an architecture turns logits into commits: LLaDA's remasking rules, or
# Dream's samplers (`alg`).
SAMPLERS = ("llada", "dream")
_DREAM_ONLY = ("alg", "alg_temp", "eps")
_LLADA_ONLY = ("remasking",)


class ParamError(ValueError):
    """A request or server parameter is invalid; `parameter` names it."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ParamError(name, f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParamError(name, f"{name} must be a non-negative integer, got {value!r}")
    return value


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ParamError(name, f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ParamError(name, f"{name} must be a positive number, got {value!r}")
    return float(value)


def _non_negative_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ParamError(name, f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def _open_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ParamError(name, f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    # The OpenAI server's vllm_xargs turns JSON booleans into 0/1.
    if value not in (True, False, 0, 1):
        raise ParamError(name, f"{name} must be a boolean, got {value!r}")
    return bool(value)


def _unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ParamError(name, f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _fractions(low_open: bool) -> Callable[[str, Any], str]:
    """A comma-separated list (or JSON list) of numbers in (0, 1] / [0, 1], kept as text."""
    def check(name: str, value: Any) -> str:
        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
        try:
            values = es.parse_fractions(text)
        except (TypeError, ValueError):
            raise ParamError(name, f"{name} must be comma-separated numbers, got {value!r}")
        if any(not (0 < v <= 1 if low_open else 0 <= v <= 1) for v in values):
            raise ParamError(name, f"{name} values must lie in {'(0, 1]' if low_open else '[0, 1]'}"
                             f", got {value!r}")
        return ",".join(repr(v) for v in values)
    return check


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in options:
            raise ParamError(name, f"{name} must be one of {', '.join(options)}, got {value!r}")
        return value
    return check


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


# name -> (default, check). gen_length, block_length and steps are checked
# together in `resolve`. LLaDA's reference defaults (spec §1.3) except
# block_length, where the README examples' 32 is what semi-autoregressive
# serving wants; `steps=None` means one step per generated token, LLaDA's
# best-quality setting.
_SPEC: dict[str, tuple[Any, Callable[[str, Any], Any]]] = {
    "gen_length": (128, _positive_int),
    "block_length": (32, _positive_int),
    "steps": (None, _optional(_positive_int)),
    "remasking": ("low_confidence", _choice(REMASKING)),
    # Dream's samplers; `alg` None until `resolve` knows the architecture.
    "alg": (None, _optional(_choice(dream.ALGS))),
    "alg_temp": (0.0, _non_negative_float),
    "eps": (dream.DEFAULT_EPS, _open_unit),
    "cache": ("none", _choice(CACHE_MODES)),
    "refresh_period": (0, _non_negative_int),
    "policy": (policies.DEFAULT_POLICY, _choice(policies.POLICIES)),
    "threshold": (policies.DEFAULT_THRESHOLD, _probability),
    "factor": (policies.DEFAULT_FACTOR, _positive_float),
    "frechet_delta": (policies.DEFAULT_FRECHET_DELTA, _positive_float),
    "r2": (False, _flag),
    "r2_window": (r2_rules.DEFAULT_WINDOW, _non_negative_int),
    "r2_spatial_threshold": (r2_rules.DEFAULT_SPATIAL_THRESHOLD, _probability),
    "r2_unmasked_limit": (r2_rules.DEFAULT_UNMASKED_LIMIT, _non_negative_int),
    "r2_token_cluster": (r2_rules.DEFAULT_TOKEN_CLUSTER, _choice(r2_rules.TOKEN_CLUSTER_MODES + ("none",))),
    "r2_temporal_steps": (r2_rules.DEFAULT_TEMPORAL_STEPS, _non_negative_int),
    "r2_temporal_threshold": (r2_rules.DEFAULT_TEMPORAL_THRESHOLD, _probability),
    "r2_temporal_aggregation": (r2_rules.DEFAULT_AGGREGATION, _choice(r2_rules.AGGREGATIONS)),
    "logits_eos_inf": (False, _flag),
    "confidence_eos_eot_inf": (False, _flag),
    "delay_eos_generation": (False, _flag),
    "skip": ("none", _choice(SKIP_MODES)),
    "es_keep": (es.DEFAULT_KEEP, _fractions(low_open=True)),
    "es_depth": (es.DEFAULT_DEPTH, _fractions(low_open=False)),
    "es_alpha": (es.DEFAULT_ALPHA, _unit),
    "es_block_update_freq": (es.DEFAULT_BLOCK_UPDATE_FREQ, _non_negative_int),
    "dyllm_threshold": (dyllm.DEFAULT_THRESHOLD, _probability),
    "dyllm_full_steps": (dyllm.DEFAULT_FULL_STEPS, _non_negative_int),
    "dyllm_query_period": (dyllm.DEFAULT_QUERY_PERIOD, _positive_int),
}
DEFAULTS: dict[str, Any] = {name: default for name, (default, _) in _SPEC.items()}


@dataclass(frozen=True)
class DllmParams:
    gen_length: int
    block_length: int
    steps: int
    remasking: str = "low_confidence"
    # Dream's sampler (None: LLaDA's remasking rule decides), its Gumbel
    # temperature and the end of its linspace(1, eps, steps + 1) schedule.
    alg: str | None = None
    alg_temp: float = 0.0
    eps: float = dream.DEFAULT_EPS
    cache: str = "none"
    # 0: Fast-dLLM's refresh at each block start; n: ES-dLLM's every n-th iteration.
    refresh_period: int = 0
    policy: str = policies.DEFAULT_POLICY
    threshold: float = policies.DEFAULT_THRESHOLD
    factor: float = policies.DEFAULT_FACTOR
    frechet_delta: float = policies.DEFAULT_FRECHET_DELTA
    r2: bool = False
    r2_window: int = r2_rules.DEFAULT_WINDOW
    r2_spatial_threshold: float = r2_rules.DEFAULT_SPATIAL_THRESHOLD
    r2_unmasked_limit: int = r2_rules.DEFAULT_UNMASKED_LIMIT
    r2_token_cluster: str = r2_rules.DEFAULT_TOKEN_CLUSTER
    r2_temporal_steps: int = r2_rules.DEFAULT_TEMPORAL_STEPS
    r2_temporal_threshold: float = r2_rules.DEFAULT_TEMPORAL_THRESHOLD
    r2_temporal_aggregation: str = r2_rules.DEFAULT_AGGREGATION
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    delay_eos_generation: bool = False
    skip: str = "none"
    es_keep: str = es.DEFAULT_KEEP
    es_depth: str = es.DEFAULT_DEPTH
    es_alpha: float = es.DEFAULT_ALPHA
    es_block_update_freq: int = es.DEFAULT_BLOCK_UPDATE_FREQ
    dyllm_threshold: float = dyllm.DEFAULT_THRESHOLD
    dyllm_full_steps: int = dyllm.DEFAULT_FULL_STEPS
    dyllm_query_period: int = dyllm.DEFAULT_QUERY_PERIOD

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def r2_settings(self) -> r2_rules.R2Settings | None:
        if not self.r2:
            return None
        return r2_rules.R2Settings(
            window=self.r2_window or None,
            spatial_threshold=self.r2_spatial_threshold,
            unmasked_limit=self.r2_unmasked_limit,
            token_cluster=None if self.r2_token_cluster == "none" else self.r2_token_cluster,
            temporal_steps=self.r2_temporal_steps or None,
            temporal_threshold=self.r2_temporal_threshold,
            aggregation=self.r2_temporal_aggregation,
        )

    def es_fractions(self, n_layers: int) -> list[float]:
        return es.layer_fractions(es.parse_fractions(self.es_keep),
                                  es.parse_fractions(self.es_depth), n_layers)

    @classmethod
    def from_resolved(cls, extra_args: dict[str, Any]) -> "DllmParams":
        return cls(**{name: extra_args[name] for name in DEFAULTS})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_known(source: str, values: dict[str, Any]) -> None:
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ParamError(unknown[0], f"unknown {source} parameter {unknown[0]!r}; "
                         f"known: {', '.join(DEFAULTS)}")


def _check_skip(given: dict[str, Any], values: dict[str, Any]) -> None:
    """Refuse a method's own parameters without that method, and what skipping cannot follow."""
    skip = values["skip"]
    for name in given:
        for method in ("es", "dyllm"):
            if name.startswith(method + "_") and skip != method:
                raise ParamError(name, f"{name} applies to skip={method}, but skip is {skip!r}")
    if len(es.parse_fractions(values["es_keep"])) != len(es.parse_fractions(values["es_depth"])):
        raise ParamError("es_keep", "es_keep and es_depth must list as many values")
    if skip == "es" and values["r2"]:
        # R²'s temporal streaks follow every masked position's prediction each
        # iteration; ES leaves some of them without logits.
        raise ParamError("r2", "r2 cannot be combined with skip=es")


def _refuse_other_sampler(given: dict[str, Any], sampler: str) -> None:
    """Refuse the other architecture's decoding parameters."""
    other = _DREAM_ONLY if sampler == "llada" else _LLADA_ONLY
    for name in other:
        if name in given:
            uses = "alg (Dream's samplers)" if sampler == "dream" else "remasking"
            raise ParamError(name, f"{name} does not apply to this model, which decodes "
                             f"with {uses}")


def _check_sampler(given: dict[str, Any], values: dict[str, Any], sampler: str) -> None:
    """The request's own parameters of the other sampler are refused; Dream always has
    an `alg`."""
    _refuse_other_sampler(given, sampler)
    if sampler == "llada":
        values["alg"] = None
    elif values["alg"] is None:
        values["alg"] = dream.DEFAULT_ALG


def server_defaults(dllm_config: dict[str, Any] | None,
                    model_defaults: dict[str, Any] | None = None,
                    sampler: str = "llada") -> dict[str, Any]:
    """Defaults for this server: `DEFAULTS`, then the model folder's own (its
    generation_config.json `dllm` entry), then `--additional-config`'s `dllm`; the
    other sampler's parameters are refused there too."""
    from_model = dict(model_defaults or {})
    _check_known("model generation_config dllm", from_model)
    overrides = dict(dllm_config or {})
    _check_known("dllm server", overrides)
    _refuse_other_sampler({**from_model, **overrides}, sampler)
    return {**DEFAULTS, **from_model, **overrides}


def resolve(
    extra_args: dict[str, Any] | None,
    defaults: dict[str, Any],
    *,
    max_tokens: int | None,
    prompt_len: int,
    max_model_len: int,
    sampler: str = "llada",
) -> DllmParams:
    """Complete and check a request's parameters for a model decoding with `sampler`.

    Without an explicit `gen_length` the canvas is the server default, shrunk to
    `max_tokens` rounded up to whole blocks.
    """
    given = dict(extra_args or {})
    _check_known("request", given)
    merged = {**defaults, **given}
    values = {name: check(name, merged[name]) for name, (_, check) in _SPEC.items()}

    block_length = values["block_length"]
    gen_length = values["gen_length"]
    if "gen_length" not in given and max_tokens is not None:
        wanted = math.ceil(max_tokens / block_length) * block_length
        gen_length = min(gen_length, max(wanted, block_length))
    if gen_length % block_length:
        raise ParamError("gen_length", f"gen_length ({gen_length}) must be a multiple "
                         f"of block_length ({block_length})")
    steps = values["steps"] if values["steps"] is not None else gen_length
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ParamError("steps", f"steps ({steps}) must split evenly over the "
                         f"{num_blocks} blocks of gen_length {gen_length} / "
                         f"block_length {block_length}")
    if values["refresh_period"] and values["cache"] == "none" and "refresh_period" in given:
        # A default period stays inert under cache none, which recomputes everything anyway.
        raise ParamError("refresh_period", "refresh_period applies to cache prefix or dual, "
                         "but cache is 'none'")
    _check_skip(given, values)
    _check_sampler(given, values, sampler)
    if prompt_len + gen_length > max_model_len:
        raise ParamError("gen_length", f"prompt ({prompt_len} tokens) + gen_length "
                         f"({gen_length}) exceeds max_model_len ({max_model_len})")
    return DllmParams(**{**values, "gen_length": gen_length, "steps": steps})
