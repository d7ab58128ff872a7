"""Reference block-diffusion decoding, one request at a time: the `generate` of SDAR
(JetAstra/SDAR `generate.py`, arXiv:2510.06303) and of LLaDA2 (`modeling_llada2_moe.py`),
written from their definitions with a full block-causal forward every step.

The oracle the plugin's block-diffusion mode is checked against; it shares no decoding
code with the plugin (only the noise definition). What it does:

* Positions are cut into blocks of `block_length` from position 0; the sequence is
  prompt + `gen_length` rounded up to a whole block. The first block decoded is the
  one holding the prompt's end (its prompt positions are never masks); every block
  before it is prompt.
* Each step of a block runs the model over the sequence up to the block's end with
  block-causal attention (a position sees its own block and the blocks before it),
  as LLaDA2's `generate` does; SDAR's reads the blocks before from a KV cache that
  holds exactly these values. The logits of position p predict position p.
* Sampling: at temperature 0 the top token, with confidence its softmax probability;
  at T > 0 a token drawn from softmax(logits / T) at the counter-based uniform of
  `vllm_dllm.sampling.noise` (seed, iteration, canvas position), with confidence its
  probability under that same distribution (SDAR's `token_prob`, LLaDA2's `x0_p`).
  With `top_k` / `top_p` that distribution is truncated first, as both originals'
  `sample_with_temperature_topk_topp` do at T > 0: the k largest tempered logits stay
  (ties with the k-th too), then, in the softmax of those, each token whose
  predecessors' mass (in descending order) is at most p. The mask id is never a
  prediction.
* Commits, among the block's masked positions sorted by descending confidence (ties to
  the lower position), at step s of the block with the schedule
  n_s = `get_num_transfer_tokens(block_length, steps)` (block_length split evenly over
  `steps`, remainder first):
  - `fixed` (SDAR's `low_confidence_static`): the n_s best;
  - `threshold` (SDAR's `low_confidence_dynamic`, LLaDA2's threshold rule): those
    with confidence >= `threshold`, or the max(n_s, 1) best if fewer clear it;
  - `factor` / `frechet`: Fast-dLLM's and Fast-dLLM++'s rules inside the block
    (`generate.commit_count`);
  - `sequential` (SDAR's `sequential`): the n_s masked positions from the block's
    first mask on, left to right, whatever their confidence.
  A block ends as soon as it has no mask. Two deviations, both where the originals
  misbehave: where fewer masks remain than n_s, the remaining masks are committed (the
  originals' top-k then also rewrites committed or prompt positions of the block), and
  the threshold test is >= (the originals' >, apart on exact ties only).
* Iterations count the forwards of the request from 0 (the noise's iteration).
* Decoding stops after the block in which an id of `stop_ids` is committed (SDAR's
  `stopping_criteria_idx`); tokens after it are left as they are.
"""

import torch

from dllm_reference.generate import commit_count
from vllm_dllm.sampling import noise

POLICIES = ("fixed", "threshold", "factor", "frechet", "sequential")


def schedule(block_length: int, steps: int) -> list[int]:
    """`get_num_transfer_tokens` of SDAR and LLaDA2: the block split over the steps."""
    base, rem = divmod(block_length, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def truncate(tempered: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Rows of tempered logits with what top-k, then top-p, removes at -inf."""
    out = tempered.clone()
    for row in out:
        if top_k > 0:
            kth = torch.topk(row, min(top_k, len(row))).values[-1]
            row[row < kth] = float("-inf")
        if top_p < 1:
            order = torch.sort(row, descending=True, stable=True).indices
            mass = torch.softmax(row, -1)[order].cumsum(0)
            # A token goes when the tokens ranked before it already hold more than p.
            row[order[1:][mass[:-1] > top_p]] = float("-inf")
    return out


def generate(
    model,
    prompt: list[int],
    *,
    mask_id: int,
    gen_length: int,
    block_length: int,
    steps: int | None = None,
    policy: str = "threshold",
    threshold: float = 0.9,
    factor: float = 1.0,
    frechet_delta: float = 0.25,
    temperature: float = 0.0,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
    top_k: int = 0,
    top_p: float = 1.0,
) -> dict:
    """Decode one request; `steps` per block (None: `block_length`, one token a step).

    Returns the canvas after the prompt (`tokens`), the forwards (`forwards`) and the
    tokens each committed (`commits`).
    """
    assert policy in POLICIES, policy
    steps = block_length if steps is None else steps
    counts = schedule(block_length, steps)
    prompt_len = len(prompt)
    end = -(-(prompt_len + gen_length) // block_length) * block_length
    x = torch.tensor(list(prompt) + [mask_id] * (end - prompt_len))
    commits: list[int] = []
    for start in range(prompt_len // block_length * block_length, end, block_length):
        stop = start + block_length
        step = 0
        while bool((x[start:stop] == mask_id).any()):
            iteration = len(commits)
            logits = model(x[:stop], block_length=block_length)[start:stop].float()
            logits[:, mask_id] = float("-inf")
            if temperature > 0:
                canvas_pos = torch.arange(start, stop) - prompt_len
                u = noise.uniforms(torch.tensor(seed), torch.tensor(iteration), canvas_pos,
                                   noise.STREAM_SAMPLE)
                tempered = truncate(logits.double() / temperature, top_k, top_p)
                x0 = noise.sample(tempered, torch.ones(block_length), u)
                probs = torch.softmax(tempered, -1)
            else:
                x0 = logits.argmax(-1)
                probs = torch.softmax(logits.double(), -1)
            conf = probs.gather(-1, x0[:, None]).squeeze(-1).tolist()
            candidates = [p for p in range(block_length) if int(x[start + p]) == mask_id]
            if policy != "sequential":  # sequential takes them in position order
                candidates.sort(key=lambda p: (-conf[p], p))
            # Past its steps (never reached by a full schedule) a block commits one or more.
            count = counts[step] if step < steps else max(1, counts[-1])
            if policy == "sequential":
                n = min(len(candidates), count)
            elif policy == "threshold":
                above = sum(1 for p in candidates if conf[p] >= threshold)
                n = min(len(candidates), max(above, count, 1))
            else:
                n = commit_count(policy, [conf[p] for p in candidates], count=count,
                                 factor=factor, frechet_delta=frechet_delta)
            for p in candidates[:n]:
                x[start + p] = x0[p]
            commits.append(n)
            step += 1
        if any(int(t) in stop_ids for t in x[prompt_len:stop]):
            break
    return {"tokens": x[prompt_len:].tolist(), "forwards": len(commits), "commits": commits}
