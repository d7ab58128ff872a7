"""Per-request decoding parameters: the one table that declares them.

Each parameter is one field of `DllmParams`: its type, default, check (which
raises `ParamError` naming it, turned into HTTP 400 at admission), one-line doc
(README's parameter table is rendered from it) and, where it belongs to one
sampler or one skipping method, which. Requests pass parameters in
`SamplingParams.extra_args` (OpenAI: `vllm_xargs`); the model folder and the
server give defaults. `resolve` runs once, in the front end, and the resolved
object travels with the request (`to_wire` / `from_wire`).
"""

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch

from vllm_dllm.sampling import dream, policies
from vllm_dllm.sampling import r2 as r2_rules

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")
SKIP_MODES = ("none", "es", "dyllm")
DYLLM_ATTENTION = ("approximate", "exact")
# How an architecture turns logits into commits: LLaDA's remasking rules, or
# Dream's samplers (`alg`).
SAMPLERS = ("llada", "dream")


class ParamError(ValueError):
    """A request or server parameter is invalid; `parameter` names it."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


Check = Callable[[str, Any], Any]


def _number(test: Callable[[float], bool], what: str, integer: bool = False) -> Check:
    def check(name: str, value: Any) -> Any:
        kinds = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not test(value):
            raise ParamError(name, f"{name} must be {what}, got {value!r}")
        return value if integer else float(value)
    return check


_positive_int = _number(lambda v: v > 0, "a positive integer", integer=True)
_non_negative_int = _number(lambda v: v >= 0, "a non-negative integer", integer=True)
_probability = _number(lambda v: 0 < v <= 1, "a number in (0, 1]")
_positive_float = _number(lambda v: v > 0, "a positive number")
_non_negative_float = _number(lambda v: v >= 0, "a non-negative number")
_open_unit = _number(lambda v: 0 < v < 1, "a number in (0, 1)")
_unit = _number(lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _flag(name: str, value: Any) -> bool:
    # The OpenAI server's vllm_xargs turns JSON booleans into 0/1.
    if value not in (True, False, 0, 1):
        raise ParamError(name, f"{name} must be a boolean, got {value!r}")
    return bool(value)


def _fractions(low_open: bool) -> Check:
    """Comma-separated numbers (or a JSON list) in (0, 1] / [0, 1], as a tuple."""
    def check(name: str, value: Any) -> tuple[float, ...]:
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        try:
            values = tuple(float(v) for v in items)
        except (TypeError, ValueError):
            values = ()
        if not values:
            raise ParamError(name, f"{name} must be comma-separated numbers, got {value!r}")
        if any(not (0 < v <= 1 if low_open else 0 <= v <= 1) for v in values):
            raise ParamError(name, f"{name} values must lie in {'(0, 1]' if low_open else '[0, 1]'}"
                             f", got {value!r}")
        return values
    return check


def _choice(options: tuple[str, ...]) -> Check:
    def check(name: str, value: Any) -> str:
        if value not in options:
            raise ParamError(name, f"{name} must be one of {', '.join(options)}, got {value!r}")
        return value
    check.options = options
    return check


def _optional(check: Check) -> Check:
    def optional(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)
    optional.options = getattr(check, "options", None)
    return optional


def _param(default: Any, check: Check, doc: str, *, sampler: str | None = None,
           skip: str | None = None, row: bool = False) -> Any:
    """One parameter: `sampler` / `skip` name the only sampler / skipping method it
    applies to (it is refused with any other); `row` puts it in a per-request device
    tensor of the decoding batch (`ROW_DTYPES`)."""
    return field(default=default, metadata={"check": check, "doc": doc, "sampler": sampler,
                                            "skip": skip, "row": row})


@dataclass(frozen=True)
class DllmParams:
    """A request's resolved decoding parameters. Defaults are LLaDA's reference
    settings (arXiv:2502.09992, Appendix B) except `block_length`, where 32 is what
    semi-autoregressive serving wants, and the papers' own for each method."""

    gen_length: int = _param(
        128, _positive_int,
        "canvas length (unset: the default shrunk to `max_tokens` rounded up to whole blocks);"
        " prompt + canvas must fit `max_model_len`; block-diffusion models round prompt +"
        " canvas up to whole blocks")
    block_length: int = _param(
        32, _positive_int,
        "semi-autoregressive block; must divide `gen_length` (block-diffusion models: the"
        " model's own block, blocks cut from position 0)", row=True)
    steps: int | None = _param(
        None, _optional(_positive_int),
        "iterations of the `fixed` policy (unset: one token per step); must split evenly over"
        " the blocks (block-diffusion models: per block, the `threshold` policy's floor too)")
    remasking: str = _param(
        "low_confidence", _choice(REMASKING),
        "LLaDA: `low_confidence` commits the most probable predictions first, `random` in"
        " random order", sampler="llada", row=True)
    alg: str | None = _param(
        None, _optional(_choice(dream.ALGS)),
        "Dream (unset: the model's `generation_config.json`, else `origin`): `origin` reveals"
        " each mask with the step's probability, `maskgit_plus` / `topk_margin` / `entropy` the"
        " step's count of masks with the highest top-1 probability / top-1 − top-2 margin /"
        " negative entropy", sampler="dream", row=True)
    alg_temp: float = _param(
        0.0, _non_negative_float,
        "Dream: > 0 draws the step's positions without replacement from softmax(confidence /"
        " `alg_temp`) instead of taking the best", sampler="dream", row=True)
    eps: float = _param(
        1e-3, _open_unit,
        "Dream: the schedule `linspace(1, eps, steps_per_block + 1)`; step i reveals the share"
        " 1 − t[i+1]/t[i] of the block's masks", sampler="dream")
    cache: str = _param(
        "none", _choice(CACHE_MODES),
        "`none` recomputes the whole sequence every iteration; `prefix` / `dual` are"
        " Fast-dLLM's approximate KV caches")
    refresh_period: int = _param(
        0, _non_negative_int,
        "`prefix` / `dual`: 0 refreshes the whole sequence at each block start (Fast-dLLM);"
        " n > 0 every n-th iteration (ES-dLLM's `prompt_update_freq`)")
    policy: str = _param(
        "fixed", _choice(policies.POLICIES),
        "which masked positions to commit (`sequential`: block-diffusion models only)", row=True)
    threshold: float = _param(
        0.9, _probability,
        "`threshold` policy: commit every prediction with confidence ≥ τ (always the top one)", row=True)
    factor: float = _param(
        1.0, _positive_float,
        "`factor` policy: commit the largest n with (k+1)(1−c_k) < f for all k ≤ n", row=True)
    frechet_delta: float = _param(
        0.25, _positive_float,
        "`frechet` policy (Fast-dLLM++): commit the prefix of the confidence profile whose gap"
        " exceeds δ", row=True)
    r2: bool = _param(False, _flag, "add R²-dLLM's redundancy rules to the policy")
    r2_window: int = _param(
        3, _non_negative_int,
        "R² confidence cluster: window width (0: off); a window whose masked mean confidence"
        " ≥ `r2_spatial_threshold` commits whole")
    r2_spatial_threshold: float = _param(
        0.8, _probability, "R² confidence and token clusters: τs")
    r2_unmasked_limit: int = _param(
        1, _non_negative_int,
        "R² confidence cluster: windows with more unmasked positions are skipped")
    r2_token_cluster: str = _param(
        "confidence", _choice(r2_rules.TOKEN_CLUSTER_MODES + ("none",)),
        "R² token cluster: in a run of adjacent masks predicting the same id, commit one"
        " (`confidence`, `mid`, `random`, or `none`)")
    r2_temporal_steps: int = _param(
        3, _non_negative_int,
        "R² temporal rule: a position whose top-1 id held n steps commits (0: off)")
    r2_temporal_threshold: float = _param(
        0.8, _probability, "R² temporal rule: τt on the aggregated confidence")
    r2_temporal_aggregation: str = _param(
        "last", _choice(r2_rules.AGGREGATIONS),
        "R² temporal rule: how a streak's confidences aggregate (`last`, `ave`, `max`)")
    logits_eos_inf: bool = _param(False, _flag, "never predict `<|endoftext|>`", row=True)
    confidence_eos_eot_inf: bool = _param(
        False, _flag, "predictions of `<|endoftext|>` / `<|eot_id|>` get confidence 0 (go last)", row=True)
    delay_eos_generation: bool = _param(
        False, _flag,
        "ES-dLLM's rule: an `<|endoftext|>` prediction gets confidence 0 while the canvas has"
        " none yet and the position before it is still a mask", row=True)
    skip: str = _param(
        "none", _choice(SKIP_MODES),
        "token skipping inside the forward pass: `es` (ES-dLLM) or `dyllm` (DyLLM)")
    es_keep: tuple[float, ...] = _param(
        (1.0, 0.5, 0.25), _fractions(low_open=True),
        "ES keep fraction by depth: layer l keeps the last fraction whose depth × layers ≤ l",
        skip="es")
    es_depth: tuple[float, ...] = _param(
        (0.0, 0.125, 0.25), _fractions(low_open=False),
        "ES: the depths (fractions of the layers) where each keep fraction starts", skip="es")
    es_alpha: float = _param(
        0.5, _unit,
        "ES importance: α · last confidence + (1 − α) · relative hidden-state change",
        skip="es")
    es_block_update_freq: int = _param(
        16, _non_negative_int, "ES: every n-th iteration of a request skips nothing (0: never)",
        skip="es")
    dyllm_threshold: float = _param(
        0.99, _probability,
        "DyLLM τ: rows whose attention context has cosine similarity < τ to their cached one"
        " are recomputed (1: all)", skip="dyllm")
    dyllm_full_steps: int = _param(
        4, _non_negative_int, "DyLLM: the first n iterations of a request recompute everything",
        skip="dyllm")
    dyllm_query_period: int = _param(
        4, _positive_int,
        "DyLLM with `cache=none`: the prompt is queried at every n-th step and during the"
        " first n only", skip="dyllm")
    dyllm_attention: str = _param(
        "approximate", _choice(DYLLM_ATTENTION),
        "DyLLM: `approximate` (the paper's) gives exact attention to the rows whose K/V the"
        " layer refreshes, and the others their cached context + softmax(qKᵀ)·ΔV; `exact`"
        " gives every row exact attention", skip="dyllm")

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

    def to_wire(self) -> dict[str, Any]:
        """The resolved parameters as `extra_args` entries (they cross process boundaries)."""
        return asdict(self)

    @classmethod
    def from_wire(cls, extra_args: dict[str, Any]) -> "DllmParams":
        """Inverse of `to_wire` (msgpack turns tuples into lists on the way)."""
        return cls(**{f.name: tuple(v) if isinstance(v := extra_args[f.name], list) else v
                      for f in fields(cls)})


_PARAMS = {f.name: f for f in fields(DllmParams)}
DEFAULTS: dict[str, Any] = {name: f.default for name, f in _PARAMS.items()}


def _options(name: str) -> tuple[str, ...] | None:
    return getattr(_PARAMS[name].metadata["check"], "options", None)


def _row_dtype(name: str) -> torch.dtype:
    if _options(name) is not None:
        return torch.long  # index into the options, -1 for unset
    return {bool: torch.bool, int: torch.long, float: torch.float64}[_PARAMS[name].type]


# The parameters the decoding batch keeps as one device tensor each, by dtype.
ROW_DTYPES: dict[str, torch.dtype] = {
    name: _row_dtype(name) for name, f in _PARAMS.items() if f.metadata["row"]}


def row_values(params: DllmParams) -> dict[str, Any]:
    """`params`' entries for the row tensors of `ROW_DTYPES` (a choice as its index)."""
    out = {}
    for name in ROW_DTYPES:
        value, options = getattr(params, name), _options(name)
        out[name] = value if options is None else -1 if value is None else options.index(value)
    return out


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "`" + ",".join(f"{v:g}" for v in value) + "`"
    if isinstance(value, str):
        return f"`{value}`"
    return f"{value:g}" if isinstance(value, float) else str(value)


def readme_table() -> list[str]:
    """README's parameter table, one row per declared parameter."""
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    for name, f in _PARAMS.items():
        rows.append(f"| `{name}` | {_shown(f.default)} | {f.metadata['doc']} |")
    return rows


# LLaDA2.1's decoding parameters for token editing (arXiv:2602.08676): committed tokens
# that later steps may replace, which the decoding core never does.
TOKEN_EDITING = ("editing_threshold", "max_post_steps")


def _check_known(source: str, values: dict[str, Any]) -> None:
    unknown = sorted(set(values) - set(_PARAMS))
    editing = [name for name in unknown if name in TOKEN_EDITING]
    if editing:
        raise ParamError(editing[0], f"{source} parameter {editing[0]!r}: LLaDA2.1's token "
                         "editing (arXiv:2602.08676) is not supported; committed tokens are "
                         "final here, so LLaDA2.1 decodes as LLaDA2.0 (mask-to-token only)")
    if unknown:
        raise ParamError(unknown[0], f"unknown {source} parameter {unknown[0]!r}; "
                         f"known: {', '.join(_PARAMS)}")


def _refuse_other_sampler(given: dict[str, Any], sampler: str) -> None:
    for name in given:
        owner = _PARAMS[name].metadata["sampler"]
        if owner not in (None, sampler):
            uses = "alg (Dream's samplers)" if sampler == "dream" else "remasking"
            raise ParamError(name, f"{name} does not apply to this model, which decodes "
                             f"with {uses}")


def _check_skip(given: dict[str, Any], values: dict[str, Any]) -> None:
    """Refuse a method's own parameters without that method, and what skipping cannot follow."""
    skip = values["skip"]
    for name in given:
        method = _PARAMS[name].metadata["skip"]
        if method not in (None, skip):
            raise ParamError(name, f"{name} applies to skip={method}, but skip is {skip!r}")
    if len(values["es_keep"]) != len(values["es_depth"]):
        raise ParamError("es_keep", "es_keep and es_depth must list as many values")
    if skip == "es" and values["r2"]:
        # R²'s temporal streaks follow every masked position's prediction each
        # iteration; ES leaves some of them without logits.
        raise ParamError("r2", "r2 cannot be combined with skip=es")


def server_defaults(dllm_config: dict[str, Any] | None,
                    model_defaults: dict[str, Any] | None = None,
                    sampler: str = "llada") -> dict[str, Any]:
    """Defaults for this server: the table's, then the model folder's own (its
    generation_config.json `dllm` entry), then `--additional-config`'s `dllm`; the
    other sampler's parameters are refused there too."""
    from_model = dict(model_defaults or {})
    _check_known("model generation_config dllm", from_model)
    overrides = dict(dllm_config or {})
    _check_known("dllm server", overrides)
    _refuse_other_sampler({**from_model, **overrides}, sampler)
    return {**DEFAULTS, **from_model, **overrides}


def _check_block_causal(values: dict[str, Any], model_block: int) -> None:
    """What a block-diffusion model refuses: its finished blocks' K/V are exact once
    written, so Fast-dLLM's approximate caches and token skipping, built to reuse stale
    K/V of a bidirectional sequence, have nothing to approximate; its blocks are the
    ones it was trained with."""
    if values["block_length"] != model_block:
        raise ParamError("block_length", f"this block-diffusion model decodes blocks of "
                         f"{model_block} (its training), got {values['block_length']}")
    for name, neutral, why in (
            ("cache", "none", "finished blocks keep exact K/V already"),
            ("skip", "none", "token skipping reuses stale rows of a bidirectional sequence"),
            ("refresh_period", 0, "it refreshes Fast-dLLM's approximate caches"),
            ("r2", False, "R²'s rules are not built for block-diffusion decoding yet")):
        if values[name] != neutral:
            raise ParamError(name, f"{name}={values[name]!r} does not apply to a "
                             f"block-diffusion model: {why}")


def resolve(
    extra_args: dict[str, Any] | None,
    defaults: dict[str, Any],
    *,
    max_tokens: int | None,
    prompt_len: int,
    max_model_len: int,
    sampler: str = "llada",
    causal_block: int | None = None,
) -> DllmParams:
    """Complete and check a request's parameters for a model decoding with `sampler`;
    `causal_block`: the block of a block-diffusion model (None: bidirectional)."""
    given = dict(extra_args or {})
    _check_known("request", given)
    _refuse_other_sampler(given, sampler)
    merged = {**defaults, **given}
    if causal_block is not None and "block_length" not in given:
        merged["block_length"] = causal_block
    values = {name: f.metadata["check"](name, merged[name]) for name, f in _PARAMS.items()}

    block_length = values["block_length"]
    gen_length = values["gen_length"]
    if causal_block is not None:
        return _resolve_block_causal(values, given, causal_block, max_tokens=max_tokens,
                                     prompt_len=prompt_len, max_model_len=max_model_len)
    if values["policy"] == "sequential":
        raise ParamError("policy", "policy='sequential' is SDAR's block-diffusion rule; this "
                         "model is bidirectional (use fixed, threshold, factor or frechet)")
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
    if prompt_len + gen_length > max_model_len:
        raise ParamError("gen_length", f"prompt ({prompt_len} tokens) + gen_length "
                         f"({gen_length}) exceeds max_model_len ({max_model_len})")
    alg = values["alg"] if sampler == "dream" else None
    if sampler == "dream" and alg is None:
        alg = dream.DEFAULT_ALG
    return DllmParams(**{**values, "gen_length": gen_length, "steps": steps, "alg": alg})


def _resolve_block_causal(values: dict[str, Any], given: dict[str, Any], model_block: int, *,
                          max_tokens: int | None, prompt_len: int, max_model_len: int
                          ) -> DllmParams:
    _check_block_causal(values, model_block)
    _check_skip(given, values)
    gen_length = values["gen_length"]
    if "gen_length" not in given and max_tokens is not None:
        gen_length = min(gen_length, max(max_tokens, 1))
    steps = values["steps"] if values["steps"] is not None else model_block
    end = -(-(prompt_len + gen_length) // model_block) * model_block
    if end > max_model_len:
        raise ParamError("gen_length", f"prompt ({prompt_len} tokens) + gen_length "
                         f"({gen_length}), rounded up to whole blocks of {model_block} "
                         f"({end}), exceeds max_model_len ({max_model_len})")
    return DllmParams(**{**values, "gen_length": gen_length, "steps": steps, "alg": None})
