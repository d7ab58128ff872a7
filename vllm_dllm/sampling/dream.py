"""Dream's samplers (`diffusion_generate`, Dream-org's `generation_utils.py`, arXiv:2508.15487), batched.

Plain PyTorch on whatever device the logits are on, no host synchronisation;
per-row parameters are tensors so one call serves rows with different settings.
The conventions (dtypes, tie rules, which uniform decides what) are those of
`dllm_reference/dream.py`, written down in its docstring:

* `schedule_ratios` is built once per request on the host; a step's ratio
  1 - t[i+1]/t[i] of `linspace(1, eps, steps + 1)` (float32) says how many of
  the block's masks the counted algorithms reveal (`reveal_counts`) and with
  which probability `origin` reveals each one (`origin_reveal`).
* `sample_tokens` turns the logits rows of masked positions into (x0, confidence)
  under temperature, top_p, top_k (`truncation.top_p_top_k`) and the row's algorithm.
* `selection_keys` are what the counted algorithms rank the candidates by: the
  confidence itself, or with `alg_temp` > 0 a Gumbel-perturbed one, whose top k
  are k draws without replacement from softmax(confidence / alg_temp).
* `select` is the whole commit rule of one step for a batch of blocks.
"""

import torch

from vllm_dllm.sampling import noise, truncation
from vllm_dllm.sampling.policies import select_fixed

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
ORIGIN, MASKGIT_PLUS, TOPK_MARGIN, ENTROPY = range(len(ALGS))
DEFAULT_ALG = "origin"  # Dream's generation_config.json, and diffusion_generate's default
# Dream's entropy adds this inside the log so that removed tokens (p = 0) count 0.
ENTROPY_EPS = 1e-10


def schedule_ratios(steps: int, eps: float) -> torch.Tensor:
    """[steps] float32 on the CPU: the share of the remaining masks revealed at each
    step, 1 - t[i+1]/t[i] of `linspace(1, eps, steps + 1)`, and 1 at the last step."""
    t = torch.linspace(1, eps, steps + 1, dtype=torch.float32, device="cpu")
    ratios = 1 - t[1:] / t[:-1]
    ratios[-1] = 1.0
    return ratios


def reveal_counts(num_masked: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """How many masks a counted algorithm reveals: int(float32(num_masked) * ratio).

    num_masked [B] integer, ratio [B] float32 (a step's `schedule_ratios` entry);
    may be 0 before the last step, all masks at the last step (ratio 1).
    """
    return (num_masked.to(torch.float32) * ratio.to(torch.float32)).long()


def origin_reveal(u: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """`origin`: whether each masked position is revealed, iff its uniform
    (`STREAM_REMASK`, float64) < ratio. u [..., K], ratio broadcast to it."""
    return u < ratio.to(torch.float64)


def sample_tokens(logits: torch.Tensor, alg: torch.Tensor, temperature: torch.Tensor,
                  top_p: torch.Tensor, top_k: torch.Tensor, u: torch.Tensor,
                  sampled: torch.Tensor | None = None, filtered: torch.Tensor | None = None,
                  used: frozenset[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, confidence) of masked positions' logits rows.

    logits [M, V] (the mask id already at -inf); alg [M] (index into ALGS),
    temperature, top_p [M] float, top_k [M] integer, u [M] float64 (the rows'
    `STREAM_SAMPLE` uniforms). The caller knows on the host which rows need the
    costly parts and passes their indices: `sampled`, the rows with temperature
    > 0 (the others take the argmax), and `filtered`, the rows with top_p < 1 or
    top_k > 0 (only those are sorted). Confidence is float64: probs[x0] (`origin`,
    `maskgit_plus`), top-1 minus top-2 probability (`topk_margin`),
    sum p log(p + 1e-10) (`entropy`), all under the tempered, filtered distribution.
    `used` (host; None: all) are the algorithms among the rows: the margin and the
    entropy, full passes over the vocabulary, are computed only where some row needs them.
    """
    temperature = temperature.to(torch.float64)
    scaled = logits.double() / torch.where(temperature > 0, temperature, 1.0)[:, None]
    if filtered is not None and filtered.numel():
        scaled = scaled.index_copy(0, filtered, truncation.top_p_top_k(
            scaled[filtered], top_p[filtered], top_k[filtered]))
    probs = torch.softmax(scaled, dim=-1)
    x0 = probs.argmax(-1)
    if sampled is not None and sampled.numel():
        ones = torch.ones(len(sampled), dtype=torch.float64, device=logits.device)
        x0 = x0.index_copy(0, sampled, noise.sample(scaled[sampled], ones, u[sampled]))
    conf = probs.gather(-1, x0[:, None]).squeeze(-1)
    if used is None or TOPK_MARGIN in used:
        top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
        conf = torch.where(alg == TOPK_MARGIN, top2[:, 0] - top2[:, -1], conf)
    if used is None or ENTROPY in used:
        entropy = (probs * torch.log(probs + ENTROPY_EPS)).sum(-1)
        conf = torch.where(alg == ENTROPY, entropy, conf)
    return x0, conf


def selection_keys(confidence: torch.Tensor, alg_temp: torch.Tensor, u: torch.Tensor
                   ) -> torch.Tensor:
    """What a counted algorithm ranks candidates by (the top `reveal_counts` win).

    confidence [B, K] float64 (-inf off the candidates), alg_temp [B] (0 = greedy),
    u [B, K] float64 (`STREAM_REMASK`). With alg_temp > 0 the key is
    confidence / alg_temp + Gumbel(u): its top k are k draws without replacement
    from softmax(confidence / alg_temp), Dream's `multinomial`.
    """
    alg_temp = alg_temp.to(torch.float64)[:, None]
    gumbel = -torch.log(-torch.log(u))
    noisy = confidence / torch.where(alg_temp > 0, alg_temp, 1.0) + gumbel
    return torch.where(alg_temp > 0, noisy, confidence)


def select(confidence: torch.Tensor, alg: torch.Tensor, alg_temp: torch.Tensor,
           ratio: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The block positions one step commits, [B, K] bool.

    confidence [B, K] float64 from `sample_tokens`, -inf wherever a position is
    not a candidate (outside the block or already committed); alg [B], alg_temp
    [B], ratio [B] (the step's `schedule_ratios` entry), u [B, K] the positions'
    `STREAM_REMASK` uniforms. `origin` reveals candidates by `origin_reveal`; the
    others the `reveal_counts` best by `selection_keys`, ties to the lower position.
    """
    candidates = confidence > float("-inf")
    counted = select_fixed(selection_keys(confidence, alg_temp, u),
                           reveal_counts(candidates.sum(-1), ratio))
    origin = candidates & origin_reveal(u, ratio[:, None])
    return torch.where((alg == ORIGIN)[:, None], origin, counted)
