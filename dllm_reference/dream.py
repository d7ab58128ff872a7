"""Plain PyTorch Dream (arXiv:2508.15487) and its `diffusion_generate`: the forward of
Dream's released `modeling_dream.py` (Qwen2 layers, bidirectional attention, logits
shifted by one), its original samplers (`generation_utils.py`) and Fast-dLLM's
block-cached variant of them (arXiv:2505.22618). The oracle the plugin is checked
against for Dream; it shares no decoding code with the plugin, only the noise
definition of `vllm_dllm.sampling.noise`.

The model reads the original checkpoint (config.json + safetensors with Qwen2
names). Logits row p predicts position p + 1 (`LOGITS_OFFSET`); the decoder
reads the prediction for position p from row p - 1, in every cache mode.

Conventions shared with the plugin so that runs can be compared token for token
(one request at a time: Dream's batch-averaged count of masks is its own count):

* Iterations: `iteration` counts every forward of the request from 0. The canvas
  is `gen_length` masks after the prompt, decoded in blocks of `block_length`
  (default: one block, Dream's original sampler); `steps` split evenly over the
  blocks, so each block runs exactly `steps / num_blocks` iterations.
* Schedule: per block, `timesteps = torch.linspace(1, eps, n + 1)` in float32 on
  the CPU (n = iterations per block); at step i, `ratio = 1 - t[i+1] / t[i]`
  (float32), and 1 at the block's last step. Counted algorithms commit
  `int(float32(masks left in the block) * ratio)` positions (possibly 0; all
  that are left at the last step).
* Logits: float32 rows, the mask id's logit set to -inf (never a prediction).
  `scaled = float64(logits) / temperature` if temperature > 0, else float64(logits).
  top_p (< 1): sort `scaled` descending, keep a token iff the softmax mass of the
  tokens before it is <= top_p (the first is always kept); top_k (> 0): keep
  tokens whose value is >= the k-th largest. Removed tokens get -inf.
  `probs = softmax(filtered)` (float64).
* x0: temperature > 0 draws from `probs` by inverse CDF at the uniform of stream
  `STREAM_SAMPLE` (`noise.sample` with temperature 1 on the filtered values);
  temperature 0 takes the argmax (lowest id on ties).
* Confidence of a position: `maskgit_plus` probs[x0]; `topk_margin` top-1 minus
  top-2 of probs; `entropy` sum(p * log(p + 1e-10)) (higher = more certain).
* `origin`: a masked position of the block is revealed iff its `STREAM_REMASK`
  uniform < ratio (float64 comparison), and then takes x0.
* Other algorithms choose `k` positions among the block's masks: with `alg_temp`
  None or 0 the k highest confidences (ties to the lower position); otherwise k
  draws without replacement from softmax(confidence / alg_temp), done as
  Gumbel-top-k: key = confidence / alg_temp - log(-log u), u the position's
  `STREAM_REMASK` uniform, the k highest keys win (same order rule).
* Caches: `prefix` / `dual` run a full forward at each block's first iteration
  (which also decodes); later iterations recompute the rows [s - 1, L) (`prefix`)
  or [s - 1, e) (`dual`) of a block [s, e) against the K/V that forward left:
  the recomputed window widens by the logits offset so that every block
  position's prediction row is fresh. No position is committed blindly.
* Token skipping (`skip=es|dyllm`): `skipping.RequestSkipping` on these
  weights with offset 1, as for LLaDA otherwise; a masked position whose
  prediction row it skipped is no candidate this iteration.
* Token filters (`token_filters`): `dllm_reference.token_filters` on every masked
  position's row (float32, before temperature, top_p and top_k); a block that
  bad-word breaks leave with masks after its steps goes on at its last ratio.
"""

from pathlib import Path

import torch

from dllm_reference import skipping
from dllm_reference.modeling import Layout, ReferenceDecoder
from dllm_reference.token_filters import bad_word_breaks, filter_row
from vllm_dllm.sampling import noise
from vllm_dllm.sampling.token_filters import TokenFilters

LOGITS_OFFSET = 1
ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


class ReferenceDream(ReferenceDecoder):
    """Dream's checkpoint (Qwen2 names, q/k/v with biases); logits not shifted."""

    layout = Layout(
        embed="model.embed_tokens.weight",
        attn_norm="model.layers.{i}.input_layernorm.weight",
        q="model.layers.{i}.self_attn.q_proj", k="model.layers.{i}.self_attn.k_proj",
        v="model.layers.{i}.self_attn.v_proj", o="model.layers.{i}.self_attn.o_proj.weight",
        ffn_norm="model.layers.{i}.post_attention_layernorm.weight",
        gate="model.layers.{i}.mlp.gate_proj.weight", up="model.layers.{i}.mlp.up_proj.weight",
        down="model.layers.{i}.mlp.down_proj.weight", final_norm="model.norm.weight",
        head="lm_head.weight", rope_full_precision=False)

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor]):
        n_heads = config["num_attention_heads"]
        super().__init__(config, state_dict, n_layers=config["num_hidden_layers"],
                         n_heads=n_heads, n_kv_heads=config.get("num_key_value_heads") or n_heads,
                         head_dim=config["hidden_size"] // n_heads,
                         eps=config.get("rms_norm_eps", 1e-6),
                         theta=config.get("rope_theta", 1e6))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32
                        ) -> "ReferenceDream":
        return cls(*cls.load(path, dtype))


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Dream's realignment of full-sequence logits: row p afterwards predicts position p
    (row 0 repeats itself; it is a prompt position, never a target)."""
    return torch.cat([logits[..., :1, :], logits[..., :-1, :]], dim=-2)


def schedule_ratios(steps: int, eps: float) -> list[float]:
    """The per-step reveal ratio 1 - t[i+1]/t[i] of `linspace(1, eps, steps + 1)`
    (float32), 1 at the last step."""
    t = torch.linspace(1, eps, steps + 1)
    ratios = [float((1 - t[i + 1] / t[i]).item()) for i in range(steps - 1)]
    return ratios + [1.0]


def filter_logits(scaled: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Dream's top_p then top_k, on one row [V] of float64 tempered logits."""
    out = scaled.clone()
    if top_p is not None and top_p < 1:
        order = torch.argsort(scaled, descending=True, stable=True)
        probs = torch.softmax(scaled[order], -1)
        before = torch.cumsum(probs, -1) - probs
        removed = before > top_p
        removed[0] = False
        out[order[removed]] = float("-inf")
    if top_k is not None and top_k > 0:
        kth = torch.topk(out, min(top_k, out.shape[-1])).values[-1]
        out[out < kth] = float("-inf")
    return out


def sample_row(logits: torch.Tensor, alg: str, temperature: float, top_p: float | None,
               top_k: int | None, u: float) -> tuple[int, float]:
    """(x0, confidence) of one masked position's logits row [V] (see the conventions)."""
    scaled = logits.double() / temperature if temperature > 0 else logits.double()
    filtered = filter_logits(scaled, top_p, top_k)
    probs = torch.softmax(filtered, -1)
    if temperature > 0:
        x0 = int(noise.sample(filtered[None], torch.ones(1, dtype=torch.float64),
                              torch.tensor([u], dtype=torch.float64))[0])
    else:
        x0 = int(torch.argmax(probs))
    if alg == "topk_margin":
        top2 = torch.topk(probs, 2).values
        conf = float(top2[0] - top2[1])
    elif alg == "entropy":
        conf = float((probs * torch.log(probs + 1e-10)).sum())
    else:
        conf = float(probs[x0])
    return x0, conf


def choose(alg: str, masked: list[int], conf: dict[int, float], ratio: float, last: bool,
           alg_temp: float | None, u_remask: list[float]) -> list[int]:
    """The masked block columns one step reveals (see the conventions); `conf` holds
    the masked columns' confidences (unused by `origin`)."""
    if alg == "origin":
        return [p for p in masked if u_remask[p] < ratio]
    k = len(masked) if last else int(
        (torch.tensor(float(len(masked))) * torch.tensor(ratio)).item())
    if alg_temp:
        key = {p: conf[p] / alg_temp - float(torch.log(-torch.log(
            torch.tensor(u_remask[p], dtype=torch.float64)))) for p in masked}
    else:
        key = conf
    return sorted(masked, key=lambda p: (-key[p], p))[:k]


def diffusion_generate(
    model: ReferenceDream,
    prompt: list[int],
    *,
    mask_id: int,
    gen_length: int = 128,
    block_length: int | None = None,
    steps: int = 128,
    alg: str = "origin",
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg_temp: float | None = None,
    eps: float = 1e-3,
    seed: int | None = None,
    cache: str = "none",
    refresh_period: int = 0,
    skip: str = "none",
    token_filters: TokenFilters | None = None,
    **skip_settings,
) -> dict:
    """Decode one request with Dream's sampler `alg` under `cache`, `skip` and
    `token_filters` (the
    skipping settings, `es_*` / `dyllm_*`, are `skipping.RequestSkipping`'s); returns the
    canvas (`tokens`), the number of forwards (`forwards`) and the commits of each
    forward (`commits`).

    Under token skipping a masked position whose prediction row was skipped is no
    candidate: the counted algorithms reveal int(candidates * ratio) of those that
    had logits, and a block left with masks after its steps goes on at the last
    step's ratio (1: every candidate) until it has none.
    """
    assert alg in ALGS, alg
    assert cache in ("none", "prefix", "dual"), cache
    assert len(prompt) >= 1, "the first position has no prediction row"
    block_length = block_length or gen_length
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    ratios = schedule_ratios(steps_per_block, eps)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    prompt_len = len(prompt)
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    commits: list[int] = []
    last_picked: list[int] = []
    skipper = skipping.request_skipping(
        model, prompt_len, len(x), skip=skip, cache=cache, mask_id=mask_id,
        block_length=block_length, logits_offset=LOGITS_OFFSET, refresh_period=refresh_period,
        **skip_settings)
    for b in range(num_blocks):
        start = prompt_len + b * block_length
        end = start + block_length
        i = 0
        while i < steps_per_block or bool((x[start:end] == mask_id).any()):
            iteration = len(commits)
            with_logits = None
            if skipper is not None:
                rows, with_logits = skipper.forward(
                    x, iteration=iteration, step_in_block=i, start=start,
                    last_commits=commits[-1] if commits else 0)
            elif cache == "none":
                rows = model(x).float()[start - LOGITS_OFFSET : end - LOGITS_OFFSET]
            elif iteration == 0 or (i == 0 and not refresh_period):
                logits, kv = model.forward_partial(x, torch.arange(len(x)))
                rows = logits.float()[start - LOGITS_OFFSET : end - LOGITS_OFFSET]
            else:
                hi = len(x) if cache == "prefix" else end
                if refresh_period and iteration % refresh_period == 0:
                    lo = 0
                else:
                    lo = min([start - LOGITS_OFFSET] + last_picked)
                # What a window recomputes stays cached (ES-dLLM's scatter update).
                window, kv = model.forward_partial(x, torch.arange(lo, hi), kv)
                rows = window.float()[start - LOGITS_OFFSET - lo : end - LOGITS_OFFSET - lo]
            rows = rows.clone()
            rows[:, mask_id] = float("-inf")
            masked = [p for p in range(block_length) if int(x[start + p]) == mask_id
                      and (with_logits is None or p in with_logits)]
            canvas_pos = torch.arange(start, end) - prompt_len
            if token_filters is not None:
                canvas = x[prompt_len:].tolist()
                for p in masked:
                    filter_row(rows[p], canvas, int(canvas_pos[p]), token_filters, mask_id)

            def draw(stream: int) -> list[float]:
                return noise.uniforms(torch.tensor(seed), torch.tensor(iteration), canvas_pos,
                                      stream).tolist()

            u_sample, u_remask = draw(noise.STREAM_SAMPLE), draw(noise.STREAM_REMASK)
            step = min(i, steps_per_block - 1)
            last = step == steps_per_block - 1
            if alg == "origin":
                chosen = choose(alg, masked, {}, ratios[step], last, alg_temp, u_remask)
                picks = {p: sample_row(rows[p], alg, temperature, top_p, top_k, u_sample[p])[0]
                         for p in chosen}
            else:
                scored = {p: sample_row(rows[p], alg, temperature, top_p, top_k, u_sample[p])
                          for p in masked}
                chosen = choose(alg, masked, {p: c for p, (_, c) in scored.items()},
                                ratios[step], last, alg_temp, u_remask)
                picks = {p: scored[p][0] for p in chosen}
            for p, token in picks.items():
                x[start + p] = token
            if token_filters is not None:
                new = {int(canvas_pos[p]) for p in picks}
                back = bad_word_breaks(x[prompt_len:].tolist(), new, token_filters, mask_id)
                for q in back:
                    x[prompt_len + q] = mask_id
                picks = {p: t for p, t in picks.items() if int(canvas_pos[p]) not in back}
            if skipper is not None:
                # ES scores rows by the raw top-1 probability of what they predict.
                skipper.record(start, {p: float(torch.softmax(rows[p].double(), -1).max())
                                       for p in masked}, list(picks))
            commits.append(len(picks))
            last_picked = [start + p for p in picks]
            i += 1
    return {"tokens": x[prompt_len:].tolist(), "forwards": len(commits), "commits": commits}
