"""Reference ES-dLLM and DyLLM forwards of one request (algorithms.md §5, §6).

Written from the spec with per-row loops where that reads plainest, on
`ReferenceLLaDA`'s weights; `generate.generate(..., skip=...)` drives them. The
conventions the plugin follows too:

* Both methods work on the cache mode's window (the positions the first layer
  computes) and skip nothing in a full iteration: a cache refresh (the first
  iteration, and every block start under prefix/dual), every
  `es_block_update_freq`-th iteration for ES, the first `dyllm_full_steps` for
  DyLLM. A full iteration fills the method's caches for every window row.
* ES: after each layer l where the keep fraction p_l drops (p_l = the last keep
  value whose depth * n_layers <= l), a sparse iteration keeps the
  max(int(p_l * W), min(last commits + 2, block_length)) best rows (W the window,
  at most the rows the layer had) by the importance score of §5.3, ties to the
  lower position; the kept rows' hidden states at that layer are cached. Rows
  dropped get no logits.
* DyLLM: layer 0 refreshes K/V only for the positions the previous iteration
  committed; every row is a query with exact attention over the current K/V;
  rows whose context has cosine similarity < tau to their cached one (tau >= 1:
  all rows) run the FFN and refresh K/V in the next layer; the others add their
  cached FFN output. Under cache `none` a sparse iteration queries the canvas
  only, unless its index is a multiple of `dyllm_query_period`.
"""

import math

import torch
import torch.nn.functional as F

from tests.reference.modeling import ReferenceLLaDA, _rms_norm, _rope


def es_layer_fractions(keep: list[float], depth: list[float], n_layers: int) -> list[float]:
    fractions = []
    for layer in range(n_layers):
        chosen = 1.0
        for p, s in zip(keep, depth):
            if layer >= s * n_layers:
                chosen = p
        fractions.append(chosen)
    return fractions


def es_drop_layers(fractions: list[float]) -> list[int]:
    return [l for l in range(1, len(fractions)) if fractions[l] < fractions[l - 1]]


def _attention(model: ReferenceLLaDA, i: int, h: torch.Tensor, rows: torch.Tensor,
               kv: list[tuple[torch.Tensor, torch.Tensor]], write: torch.Tensor):
    """q for `rows`, K/V written at the positions in `write` (a subset of `rows`);
    returns the attention context [len(rows), d] over the whole cached sequence."""
    p = f"blocks.{i}."
    n, hd = len(rows), model.head_dim

    def heads(name: str, count: int) -> torch.Tensor:
        return (h @ model.w(p + name).T).view(n, count, hd).transpose(0, 1)

    q = _rope(heads("q_proj.weight", model.n_heads), rows, model.theta)
    k_new = _rope(heads("k_proj.weight", model.n_kv_heads), rows, model.theta)
    v_new = heads("v_proj.weight", model.n_kv_heads)
    k, v = kv[i]
    for j, pos in enumerate(rows.tolist()):
        if pos in set(write.tolist()):
            k[:, pos], v[:, pos] = k_new[:, j], v_new[:, j]
    if model.n_kv_heads != model.n_heads:
        rep = model.n_heads // model.n_kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=False)
    return a.transpose(0, 1).reshape(n, -1)


def _ffn(model: ReferenceLLaDA, i: int, x: torch.Tensor) -> torch.Tensor:
    p = f"blocks.{i}."
    h = _rms_norm(x, model.w(p + "ff_norm.weight"), model.eps)
    return (F.silu(h @ model.w(p + "ff_proj.weight").T) * (h @ model.w(p + "up_proj.weight").T)
            ) @ model.w(p + "ff_out.weight").T


def _head(model: ReferenceLLaDA, x: torch.Tensor) -> torch.Tensor:
    return _rms_norm(x, model.w("ln_f.weight"), model.eps) @ model.w("ff_out.weight").T


def es_forward(model: ReferenceLLaDA, tokens: torch.Tensor, window: torch.Tensor,
               kv: list[tuple[torch.Tensor, torch.Tensor]], hidden: dict[int, torch.Tensor],
               *, fractions: list[float], sparse: bool, alpha: float, last_conf: torch.Tensor,
               fresh: torch.Tensor, leftmost: int, last_commits: int, block_length: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ES pass over `window`; updates `kv` and `hidden` in place. Returns the
    positions that reached the last layer and their logits."""
    rows = window.clone()
    x = F.embedding(tokens[rows], model.w("wte.weight"))
    drops = es_drop_layers(fractions)
    size = len(window)
    for i in range(model.n_layers):
        h = _rms_norm(x, model.w(f"blocks.{i}.attn_norm.weight"), model.eps)
        context = _attention(model, i, h, rows, kv, rows)
        x = x + context @ model.w(f"blocks.{i}.attn_out.weight").T
        x = x + _ffn(model, i, x)
        if i not in drops:
            continue
        cache = hidden.setdefault(i, torch.zeros(len(tokens), x.shape[-1]))
        if sparse:
            count = max(int(fractions[i] * size), min(last_commits + 2, block_length))
            count = max(1, min(count, len(rows)))
            if count < len(rows):
                scores = []
                changes = []
                for j, pos in enumerate(rows.tolist()):
                    prev = cache[pos]
                    rms = prev.norm() / math.sqrt(len(prev))
                    changes.append(float((x[j] - prev).abs().mean() / (rms + 1e-6)))
                top = max(max(changes), 1.0)
                confs = [float(last_conf[pos]) for pos in rows.tolist()]
                best_two = sorted(range(len(rows)), key=lambda j: (-confs[j], j))[:2]
                for j, pos in enumerate(rows.tolist()):
                    score = alpha * confs[j] + (1 - alpha) * changes[j] / top
                    if alpha > 0 and j in best_two:
                        score += 2.0
                    if pos == leftmost:
                        score += 5.0
                    if alpha < 1 and bool(fresh[pos]):
                        score += 3.0
                    scores.append(score)
                order = sorted(range(len(rows)), key=lambda j: (-scores[j], j))[:count]
                keep = torch.tensor(sorted(order))
                rows, x = rows[keep], x[keep]
        cache[rows] = x
    return rows, _head(model, x)


def dyllm_forward(model: ReferenceLLaDA, tokens: torch.Tensor, window: torch.Tensor,
                  kv: list[tuple[torch.Tensor, torch.Tensor]],
                  contexts: dict[int, torch.Tensor], ffns: dict[int, torch.Tensor],
                  *, sparse: bool, tau: float, fresh: torch.Tensor) -> torch.Tensor:
    """One DyLLM pass over `window`; updates `kv`, `contexts`, `ffns`. Returns the
    logits of every window row."""
    rows = window
    x = F.embedding(tokens[rows], model.w("wte.weight"))
    salient = [not sparse or bool(fresh[pos]) for pos in rows.tolist()]
    for i in range(model.n_layers):
        h = _rms_norm(x, model.w(f"blocks.{i}.attn_norm.weight"), model.eps)
        write = torch.tensor([pos for pos, s in zip(rows.tolist(), salient) if s],
                             dtype=torch.long)
        context = _attention(model, i, h, rows, kv, write)
        c_cache = contexts.setdefault(i, torch.zeros(len(tokens), context.shape[-1]))
        m_cache = ffns.setdefault(i, torch.zeros(len(tokens), x.shape[-1]))
        if sparse:
            salient = []
            for j, pos in enumerate(rows.tolist()):
                cos = float(F.cosine_similarity(context[j], c_cache[pos], dim=0, eps=1e-12))
                salient.append(tau >= 1 or cos < tau)
        else:
            salient = [True] * len(rows)
        c_cache[rows] = context
        x = x + context @ model.w(f"blocks.{i}.attn_out.weight").T
        for j, pos in enumerate(rows.tolist()):
            if salient[j]:
                m_cache[pos] = _ffn(model, i, x[j : j + 1])[0]
        x = x + m_cache[rows]
    return _head(model, x)
