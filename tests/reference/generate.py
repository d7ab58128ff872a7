"""Reference LLaDA decoding (algorithms.md §1.3), one request at a time, full recompute.

Conventions shared with the plugin so that seeded runs can be compared token for
token: randomness is the counter-based definition of `vllm_dllm.sampling.noise`
(a uniform per (seed, iteration, canvas position, stream), the iteration counting
the request's denoising iterations from 0); at temperature > 0 a position's token
is drawn from softmax(logits / T) at its sampling uniform, and `random` remasking
scores a position with its remasking uniform. Confidence is the float64 softmax
probability of the chosen token; ties go to the lower position.
"""

import torch

from vllm_dllm.sampling import noise


def num_transfer_tokens(num_masked: int, steps: int) -> list[int]:
    base, rem = divmod(num_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


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
) -> dict:
    """Decode one request; returns the canvas and the number of forward passes.

    `cache` is Fast-dLLM's approximate KV cache (spec §3.1): `prefix` and `dual`
    run one full forward at each block start (which also decodes) and keep its
    K/V; later steps of the block recompute block + suffix (`prefix`) or the block
    only (`dual`) against those cached K/V.
    """
    assert cache in ("none", "prefix", "dual")
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    prompt_len = len(prompt)
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    forwards = 0
    for b in range(num_blocks):
        start = prompt_len + b * block_length
        block = slice(start, start + block_length)
        schedule = num_transfer_tokens(int((x[block] == mask_id).sum()), steps_per_block)
        for i in range(steps_per_block):
            if cache == "none":
                logits = model(x).float()
            elif i == 0:
                logits, kv = model.forward_partial(x, torch.arange(len(x)))
            else:
                stop = len(x) if cache == "prefix" else start + block_length
                window, _ = model.forward_partial(x, torch.arange(start, stop), kv)
                logits = torch.zeros(len(x), window.shape[-1])
                logits[start:stop] = window
            logits = logits.float()
            forwards += 1
            rows = logits[start - logits_offset : start - logits_offset + block_length].clone()
            # Never predict the mask itself (the untrained models here can).
            rows[:, mask_id] = float("-inf")
            canvas_pos = torch.arange(start, start + block_length) - prompt_len

            def draw(stream: int) -> torch.Tensor:
                return noise.uniforms(torch.tensor(seed), torch.tensor(forwards - 1), canvas_pos,
                                      stream)

            if temperature > 0:
                x0 = noise.sample(rows, torch.full((block_length,), temperature),
                                  draw(noise.STREAM_SAMPLE))
            else:
                x0 = rows.argmax(-1)
            if remasking == "low_confidence":
                probs = torch.softmax(rows.double(), -1)
                conf = probs.gather(-1, x0[:, None]).squeeze(-1)
            elif remasking == "random":
                conf = draw(noise.STREAM_REMASK)
            else:
                raise ValueError(remasking)
            masked = x[block] == mask_id
            conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
            order = torch.sort(conf, descending=True, stable=True).indices
            chosen = order[: schedule[i]]
            blk = x[block].clone()
            blk[chosen] = x0[chosen]
            x[block] = blk
    return {"tokens": x[prompt_len:].tolist(), "forwards": forwards}
