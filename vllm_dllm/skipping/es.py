"""ES-dLLM early skipping (arXiv:2603.10088; zhuzj19/ES-dLLM): which rows continue past the skip layers.

Every iteration computes the cache mode's window in the first layers; at the end
of each layer where the keep fraction drops, the rows are scored by importance
and only the best ones go on. The dropped rows keep the K/V an earlier pass left
in the pages and produce no logits this iteration.

Importance (ES-dLLM's mode `HiddenState`, `early_skipping.py`), per row t of a request's window at layer l:
  change_t = mean_d |h_t - H_l[t]| / (||H_l[t]||_2 / sqrt(d) + 1e-6), divided by
             max(max_t change_t, 1);
  score_t  = alpha * last_conf_t + (1 - alpha) * change_t
             + 2 for the two rows of highest last_conf (if alpha > 0)
             + 5 for the leftmost still-masked position of the block
             + 3 for positions committed by the previous iteration (if alpha < 1),
where H_l is the row's hidden state at layer l when it was last kept and
last_conf the probability of its top prediction when it last had logits (0 once
committed).
"""

import torch

TOP_CONF_BONUS = 2.0
LEFTMOST_MASK_BONUS = 5.0
FRESH_BONUS = 3.0


def layer_fractions(keep: tuple[float, ...], depth: tuple[float, ...], n_layers: int
                    ) -> list[float]:
    """Keep fraction p_l of every layer: the last `keep[j]` whose `depth[j] * n_layers <= l`."""
    out = []
    for layer in range(n_layers):
        p = 1.0
        for fraction, start in zip(keep, depth):
            if layer >= start * n_layers:
                p = fraction
        out.append(p)
    return out


def keep_counts(fractions: list[float], window: int, last_commits: int, block_length: int
                ) -> dict[int, int]:
    """Rows that continue after each layer where the keep fraction drops.

    ES-dLLM's count: max(int(p_l * window), min(last_commits + 2, block_length)),
    never more than the rows the layer computed.
    """
    counts: dict[int, int] = {}
    rows = window
    for layer in range(1, len(fractions)):
        if fractions[layer] < fractions[layer - 1]:
            n = max(int(fractions[layer] * window), min(last_commits + 2, block_length))
            n = max(1, min(n, rows))
            if n < rows:
                counts[layer] = n
                rows = n
    return counts


def importance(hidden: torch.Tensor, previous: torch.Tensor, last_conf: torch.Tensor,
               leftmost: torch.Tensor, fresh: torch.Tensor, valid: torch.Tensor,
               alpha: torch.Tensor) -> torch.Tensor:
    """Scores [B, W] of padded rows: `hidden`, `previous` [B, W, d]; `last_conf` [B, W]
    float; `leftmost`, `fresh`, `valid` [B, W] bool; `alpha` [B]. Padding scores -inf."""
    alpha = alpha.float()[:, None]
    h, prev = hidden.float(), previous.float()
    scale = prev.norm(dim=-1) / prev.shape[-1] ** 0.5 + 1e-6
    change = (h - prev).abs().mean(-1) / scale
    change = torch.where(valid, change, torch.zeros_like(change))
    change = change / change.amax(-1, keepdim=True).clamp(min=1.0)
    conf = torch.where(valid, last_conf.float(), torch.zeros_like(change))
    score = alpha * conf + (1 - alpha) * change
    top = torch.where(valid, conf, torch.full_like(conf, -1.0))
    score = score + TOP_CONF_BONUS * ((_ranks(top) < 2) & (alpha > 0)).float()
    score = score + LEFTMOST_MASK_BONUS * leftmost.float()
    score = score + FRESH_BONUS * (fresh & (alpha < 1)).float()
    return torch.where(valid, score, torch.full_like(score, float("-inf")))


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry of its row by descending value; ties go to the lower column."""
    order = torch.sort(values, dim=-1, descending=True, stable=True)[1]
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def keep_mask(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The `counts[b]` best-scoring columns of each row [B, W] (ties to the lower column)."""
    return (_ranks(score) < counts[:, None]) & (score > float("-inf"))
