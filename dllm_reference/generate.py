"""Reference LLaDA decoding, one request at a time: LLaDA's semi-autoregressive block
decoding (`generate()` of the LLaDA repository, arXiv:2502.09992), with Fast-dLLM's caches
and parallel commit rules (arXiv:2505.22618) and Fast-dLLM++'s Fréchet rule
(arXiv:2606.02955).

The oracle the plugin is checked against; it shares no decoding code with the
plugin (only the noise definition below), and chooses commits with a plain loop
over one request's sorted candidates.

Conventions shared with the plugin so that runs can be compared token for token:

* Randomness is the counter-based definition of `vllm_dllm.sampling.noise`: a
  uniform per (seed, iteration, canvas position, stream), the iteration counting
  every forward of the request from 0 (under every policy and cache mode);
  `seed=None` draws a fresh seed, so only seeded runs are reproducible. At
  temperature > 0 a position's token is drawn from softmax(logits / T) at its
  sampling uniform; `random` remasking scores a position with its remasking
  uniform, and that score is the "confidence" every policy then reads.
* The mask id is never a prediction (its logit is -inf).
* Confidence (`low_confidence`) is the float64 softmax probability, under the
  raw (untempered) logits, of the chosen token. Candidates are the masked
  positions of the current block, sorted by descending confidence with ties
  going to the lower position.
* Policies (which candidates an iteration commits):
  - `fixed`: LLaDA's `get_num_transfer_tokens` schedule, computed once per block
    from its masks: the block's masks split evenly over steps / num_blocks
    iterations, remainder first; exactly that many iterations per block.
  - `threshold` (Fast-dLLM's confidence-aware parallel decoding): every
    candidate with confidence >= tau, and always the top-1 candidate.
  - `factor` (the factor rule of Fast-dLLM's code): the largest n >= 1 such that
    the sorted candidates satisfy c(k) >= 1 - f / (k + 1) (float64, equality
    accepted) for every 2 <= k <= n (k = 1 always passes). Fast-dLLM v1's loop also commits the
    first failing candidate when it is the last one; like the plugin, we do not.
  - `frechet` (Fast-dLLM++'s Fréchet profile decoding): n* = the number of n with
    G_n = (sum_{j<=n} c(j) - (n - 1)) - (1 - c(n)) > delta, at least 1; the
    prefix sum is accumulated in float64 in rank order. The max(0, .) of the
    lower bound is left out as in Fast-dLLM++'s code (it changes no decision for
    delta >= 0).
  Non-fixed policies leave a block as soon as it has no mask left (at least one
  iteration each, no fixed number: `steps` is then unused).
* Caches (Fast-dLLM's PrefixCache and DualCache, arXiv:2505.22618 §3.2): with
  `prefix` / `dual` the first iteration of every block is a full forward (which
  also decodes); later ones recompute block + suffix (`prefix`) or the block
  only (`dual`) against the K/V that forward left, from `logits_offset` rows
  before the block (the rows that predict it; so do the skipping windows, and
  DyLLM's canvas-only queries under `none`).
* Token filters (`token_filters`: vLLM's `logit_bias`, `allowed_token_ids`,
  `bad_words`, `min_tokens`): `dllm_reference.token_filters`, on every masked
  position's row before its token and confidence; a block left with masks after its
  steps (bad-word breaks) goes on as under skipping.
* Logprobs (`logprobs` k): a committed token's record is taken from the iteration that
  commits it: log softmax of its position's filtered logits (divided by the temperature
  when it samples) at the token, and the top k of that distribution.
"""

import torch

from dllm_reference import skipping
from dllm_reference.token_filters import bad_word_breaks, filter_row
from vllm_dllm.sampling import noise
from vllm_dllm.sampling.token_filters import TokenFilters

POLICIES = ("fixed", "threshold", "factor", "frechet")


def num_transfer_tokens(num_masked: int, steps: int) -> list[int]:
    base, rem = divmod(num_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def commit_count(policy: str, conf: list[float], *, count: int = 0, threshold: float = 0.9,
                 factor: float = 1.0, frechet_delta: float = 0.25) -> int:
    """How many of the sorted candidate confidences `conf` (descending) a policy commits.

    `count` is the fixed schedule's number for this iteration. Every rule commits
    a prefix of the sorted candidates: for `threshold` the candidates >= tau come
    first, and the forced top-1 makes the count at least 1.
    """
    m = len(conf)
    if m == 0:
        return 0
    if policy == "fixed":
        return min(count, m)
    if policy == "threshold":
        return max(1, sum(1 for c in conf if c >= threshold))
    if policy == "factor":
        n = 1
        for k in range(2, m + 1):
            if conf[k - 1] >= 1 - factor / (k + 1):
                n = k
            else:
                break
        return n
    if policy == "frechet":
        total, passing = 0.0, 0
        for n in range(1, m + 1):
            total += conf[n - 1]
            gap = (total - (n - 1)) - (1 - conf[n - 1])
            if gap > frechet_delta:
                passing += 1
        return max(1, passing)
    raise ValueError(f"unknown policy {policy!r}")


def generate(
    model,
    prompt: list[int],
    *,
    mask_id: int,
    gen_length: int = 128,
    block_length: int = 128,
    steps: int = 128,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    seed: int | None = None,
    logits_offset: int = 0,
    cache: str = "none",
    refresh_period: int = 0,
    policy: str = "fixed",
    threshold: float = 0.9,
    factor: float = 1.0,
    frechet_delta: float = 0.25,
    skip: str = "none",
    delay_eos_generation: bool = False,
    eos_id: int | None = None,
    token_filters: TokenFilters | None = None,
    logprobs: int | None = None,
    **skip_settings,
) -> dict:
    """Decode one request under `policy` (with its `threshold`, `factor` or
    `frechet_delta`), `cache` and `skip` (with `skipping.RequestSkipping`'s settings,
    `es_*` / `dyllm_*`, in `skip_settings`) and `token_filters`; `steps` is used by
    the `fixed` policy only. A fixed-schedule block that skipping or a bad word left
    unfinished after its steps goes on committing max(1, schedule) tokens an iteration.

    Returns the canvas (`tokens`), the number of forward passes (`forwards`) and
    how many tokens each forward committed (`commits`, one entry per forward); with
    `logprobs` k, per canvas position (`logprobs`) its token's logprob and the top k
    (id, logprob) pairs, best first (None where nothing was committed).
    """
    assert cache in ("none", "prefix", "dual")
    # ES-dLLM's Dream path scores skipped rows before its EOS delay; only LLaDA's is here.
    assert not delay_eos_generation or (eos_id is not None and logits_offset == 0)
    assert policy in POLICIES, policy
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    if policy == "fixed":
        assert steps % num_blocks == 0
        steps_per_block = steps // num_blocks
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    prompt_len = len(prompt)
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    length = len(x)
    commits: list[int] = []
    records: list[tuple | None] = [None] * gen_length
    last_chosen: list[int] = []
    skipper = skipping.request_skipping(
        model, prompt_len, length, skip=skip, cache=cache, mask_id=mask_id,
        block_length=block_length, logits_offset=logits_offset, refresh_period=refresh_period,
        **skip_settings)
    for b in range(num_blocks):
        start = prompt_len + b * block_length
        block = slice(start, start + block_length)
        if policy == "fixed":
            schedule = num_transfer_tokens(int((x[block] == mask_id).sum()), steps_per_block)
        i = 0
        while bool((x[block] == mask_id).any()) or (policy == "fixed" and i < steps_per_block):
            iteration = len(commits)  # forwards of this request before this one
            candidates_with_logits = None
            if skipper is not None:
                rows, candidates_with_logits = skipper.forward(
                    x, iteration=iteration, step_in_block=i, start=start,
                    last_commits=commits[-1] if commits else 0)
            else:
                if cache == "none":
                    logits = model(x).float()
                elif iteration == 0 or (i == 0 and not refresh_period):
                    logits, kv = model.forward_partial(x, torch.arange(len(x)))
                else:
                    stop = len(x) if cache == "prefix" else start + block_length
                    if refresh_period and iteration % refresh_period == 0:
                        lo = 0
                    else:
                        # ES-dLLM's schedule: the last commits' K/V may lie before the block.
                        lo = max(0, min([start - logits_offset] + last_chosen))
                    # What a window recomputes stays cached (ES-dLLM's scatter update).
                    window, kv = model.forward_partial(x, torch.arange(lo, stop), kv)
                    logits = torch.zeros(len(x), window.shape[-1])
                    logits[lo:stop] = window
                logits = logits.float()
                rows = logits[start - logits_offset : start - logits_offset + block_length].clone()
            # Never predict the mask itself (the untrained models here can).
            rows[:, mask_id] = float("-inf")
            canvas_pos = torch.arange(start, start + block_length) - prompt_len
            if token_filters is not None:
                canvas = x[prompt_len:].tolist()
                for p in range(block_length):
                    if int(x[start + p]) == mask_id:
                        filter_row(rows[p], canvas, int(canvas_pos[p]), token_filters, mask_id)

            def draw(stream: int) -> torch.Tensor:
                return noise.uniforms(torch.tensor(seed), torch.tensor(iteration), canvas_pos,
                                      stream)

            if temperature > 0:
                x0 = noise.sample(rows, torch.full((block_length,), temperature),
                                  draw(noise.STREAM_SAMPLE))
            else:
                x0 = rows.argmax(-1)
            probs = torch.softmax(rows.double(), -1)
            if remasking == "low_confidence":
                conf = probs.gather(-1, x0[:, None]).squeeze(-1)
            elif remasking == "random":
                conf = draw(noise.STREAM_REMASK)
            else:
                raise ValueError(remasking)
            conf = conf.tolist()
            delayed: set[int] = set()
            if delay_eos_generation:
                # ES-dLLM's rule (zhuzj19/ES-dLLM generate.py, sample_tokens_LLaDA): an EOS
                # predicted right after a mask, while the canvas has none yet, gets
                # confidence 0; ES's skip score reads that 0.
                has_eos = bool((x[prompt_len:] == eos_id).any())
                delayed = {p for p in range(block_length) if not has_eos
                           and int(x0[p]) == eos_id and int(x[start + p - 1]) == mask_id}
                for p in delayed:
                    conf[p] = 0.0
            candidates = [p for p in range(block_length) if int(x[start + p]) == mask_id
                          and (candidates_with_logits is None or p in candidates_with_logits)]
            candidates.sort(key=lambda p: (-conf[p], p))
            if policy == "fixed":
                count = schedule[i] if i < steps_per_block else max(1, schedule[-1])
            n = commit_count(policy, [conf[p] for p in candidates],
                             count=count if policy == "fixed" else 0,
                             threshold=threshold, factor=factor, frechet_delta=frechet_delta)
            chosen = candidates[:n]
            for p in chosen:
                x[start + p] = x0[p]
            if token_filters is not None:
                new = {int(canvas_pos[p]) for p in chosen}
                back = bad_word_breaks(x[prompt_len:].tolist(), new, token_filters, mask_id)
                for q in back:
                    x[prompt_len + q] = mask_id
                chosen = [p for p in chosen if int(canvas_pos[p]) not in back]
            if logprobs is not None:
                scaled = rows.double() / (temperature if temperature > 0 else 1.0)
                for p in chosen:
                    lp = torch.log_softmax(scaled[p], -1)
                    top = lp.topk(logprobs)
                    records[int(canvas_pos[p])] = (float(lp[x0[p]]), list(zip(
                        top.indices.tolist(), top.values.tolist())))
            if skipper is not None:
                skipper.record(start, {p: 0.0 if p in delayed else float(probs[p].max())
                                       for p in candidates}, chosen)
            commits.append(len(chosen))
            last_chosen = [start + p for p in chosen]
            i += 1
    return {"tokens": x[prompt_len:].tolist(), "forwards": len(commits), "commits": commits,
            "logprobs": records}
