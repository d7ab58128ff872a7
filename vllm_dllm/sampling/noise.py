"""Counter-based randomness: every random number is a function of (seed, iteration, position, stream).

Nothing is drawn from a stateful generator, so a request's randomness is the same
whatever else shares its batch, whichever device it runs on, and after a
preemption; the reference decoder calls these same functions. One uniform comes
from a 32-bit integer hash of the request's seed, its iteration counter, the
canvas position and a stream id (what the number is for), computed for a whole
batch of rows at once on the logits' device.

Sampling at temperature T > 0 draws a token from softmax(logits / T) by inverting
the row's cumulative distribution at one such uniform. That is the distribution
LLaDA's float64 Gumbel-max (`exp(l) / (-log u)^T`, LLaDA's `generate.py`) samples from, with
one uniform per row instead of one per vocabulary entry. The cost is a float64
softmax and a cumulative sum over the sampled rows (and, at any temperature, a float64
logsumexp over every row: `log_normalizer`), done in chunks of at most
`SAMPLE_CHUNK_ELEMENTS` elements, so the extra memory is bounded by about
3 x 8 bytes x that number (~400 MB), whatever the batch.
"""

import torch

# What a uniform is used for; each stream is independent of the others.
STREAM_SAMPLE = 0
STREAM_REMASK = 1
STREAM_TOKEN_CLUSTER = 2

SAMPLE_CHUNK_ELEMENTS = 1 << 24

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: products of 32-bit values stay inside int64.
_MUL_A = 0x7FEB352D
_MUL_B = 0x2C1B3C6D
_STREAM_SALT = 0x5BD1E995 & 0x7FFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche of 32-bit values held in int64."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 16)


def uniforms(seed: torch.Tensor, iteration: torch.Tensor, position: torch.Tensor,
             stream: int) -> torch.Tensor:
    """One float64 uniform in (0, 1) per element of the broadcast int64 arguments."""
    x = _mix32((seed & _MASK32) ^ (stream * _STREAM_SALT & _MASK32))
    x = _mix32(x ^ ((seed >> 32) & _MASK32))
    x = _mix32(x ^ (iteration & _MASK32))
    x = _mix32(x ^ (position & _MASK32))
    return (x.to(torch.float64) + 0.5) * 2.0**-32


def log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """The float64 logsumexp of each row of `logits` [N, V], in chunks of rows like
    `sample` (a float64 copy of all of LLaDA-8B's logits rows is 1 MB a row)."""
    rows = max(1, SAMPLE_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    out = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    for lo in range(0, logits.shape[0], rows):
        out[lo:lo + rows] = torch.logsumexp(logits[lo:lo + rows].double(), -1)
    return out


def sample(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens drawn from softmax(logits / temperature) per row, by inverse CDF at `u`.

    logits [N, V]; temperature and u [N], temperature > 0. Tokens whose logit is
    -inf have probability 0 and are never drawn.
    """
    rows = max(1, SAMPLE_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for lo in range(0, logits.shape[0], rows):
        hi = lo + rows
        scaled = logits[lo:hi].double() / temperature[lo:hi, None].double()
        cdf = torch.softmax(scaled, dim=-1).cumsum_(dim=-1)
        target = (u[lo:hi] * cdf[:, -1]).unsqueeze(-1)
        out[lo:hi] = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(
            max=logits.shape[-1] - 1)
    return out
