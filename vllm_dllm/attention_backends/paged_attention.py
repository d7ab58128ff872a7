"""Non-causal attention of arbitrary query rows over paged K/V, one call for a whole batch.

No vLLM imports: this module is what runs on the model's device, and it can be
tested and timed on a machine with only torch (and triton for the GPU kernel).
Page layout: [num_blocks, num_kv_heads, block_size, 2 * head_size], K in the
first half of the last axis and V in the second (any strides).

Two implementations of the same call:
- `paged_attention_torch`: one padded scaled-dot-product call (CPU and fallback);
- `paged_attention_triton`: a Triton kernel that reads K/V in place through the
  block table with an online softmax (CUDA; also runs under TRITON_INTERPRET=1).
`paged_attention` picks the kernel for CUDA tensors and the torch path otherwise. On
CUDA the vLLM backend prefers vLLM's FlashAttention for exact passes; these serve
where it cannot (float32, a GPU without it) and `gpu_check` times them against it.

DyLLM's approximate attention (`approximate_attention`, `DeltaRows`) works on each
request's K/V gathered from the pages (`gather_pages` for this layout; the backend
gathers vLLM's CPU layout itself), one padded batched computation on any device.
"""

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the torch path still works
    triton = None


class PagedRows(Protocol):
    """Query rows of a pass over paged K/V (the attention metadata has these fields):
    request b's rows are `query_start_loc[b]:query_start_loc[b+1]` and it has
    `seq_lens[b]` positions in the pages `block_table[b]` lists."""

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int
    max_seq_len: int


def write_kv(kv_cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Store K/V rows [N, num_kv_heads, head_size] at their cache slots. Rows whose slot
    is negative (vLLM's convention for padding) are not stored: they go to page 0,
    which vLLM's block pool keeps back as its null block and never gives a request, so
    no boolean index (a host synchronisation on CUDA) is needed."""
    block_size, head_size = kv_cache.shape[2], key.shape[-1]
    slots = slots.clamp(min=0)
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, :, offsets, :head_size] = key
    kv_cache[blocks, :, offsets, head_size:] = value


def _padded_queries(query: torch.Tensor, rows: PagedRows
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [N, ...] laid out [B, max_query_len, ...] (zeros in the padding), with each
    row's request and its index among its request's rows."""
    n, batch = query.shape[0], rows.seq_lens.shape[0]
    starts = rows.query_start_loc[:-1].long()
    lengths = rows.query_start_loc[1:].long() - starts
    request = torch.repeat_interleave(torch.arange(batch, device=query.device), lengths,
                                      output_size=n)
    slot = torch.arange(n, device=query.device) - starts[request]
    padded = query.new_zeros(batch, rows.max_query_len, *query.shape[1:])
    padded[request, slot] = query
    return padded, request, slot


def gather_pages(kv_cache: torch.Tensor, rows: PagedRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Each request's K and V, [B, H_kv, max_seq_len, D], positions in order (past a
    request's `seq_lens` the values are whatever its last page holds)."""
    num_kv_heads, block_size, head_size = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    batch, max_seq_len = rows.seq_lens.shape[0], rows.max_seq_len
    pages = -(-max_seq_len // block_size)
    # One gather, heads first, so that the per-request view below needs no second copy.
    kv = kv_cache.transpose(0, 1)[:, rows.block_table[:, :pages].long()]  # [H_kv, B, pages, block, 2D]
    kv = kv.reshape(num_kv_heads, batch, pages * block_size, 2 * head_size).transpose(0, 1)
    return kv[..., :max_seq_len, :head_size], kv[..., :max_seq_len, head_size:]


def read_values(kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The V rows [N, H_kv, D] stored at `slots` (negative: page 0's, see `write_kv`)."""
    block_size, head_size = kv_cache.shape[2], kv_cache.shape[3] // 2
    slots = slots.clamp(min=0)
    return kv_cache[slots // block_size, :, slots % block_size, head_size:]


def _key_mask(rows: PagedRows, device: torch.device) -> torch.Tensor:
    keys = torch.arange(rows.max_seq_len, device=device)
    return (keys[None, :] < rows.seq_lens[:, None].long())[:, None, None, :]  # [B, 1, 1, L]


def _per_head(kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, H_kv, ...] repeated to [B, H, ...] (grouped-query attention)."""
    group = num_heads // kv.shape[1]
    return kv if group == 1 else kv.repeat_interleave(group, dim=1)


def paged_attention_torch(query: torch.Tensor, kv_cache: torch.Tensor, rows: PagedRows,
                          scale: float, out: torch.Tensor) -> torch.Tensor:
    """out[t] = softmax(q_t K_b^T * scale) V_b over every position < seq_lens[b] of t's request b.

    query [N, H, D] laid out as `rows` says. One padded scaled-dot-product call for the batch: the
    queries are laid out [B, H, max_query_len, D], each request's pages gathered to
    [B, H_kv, max_seq_len, D] and the padding keys masked out.
    """
    n, num_heads = query.shape[0], query.shape[1]
    if n == 0 or rows.seq_lens.shape[0] == 0:
        return out
    q, request, slot = _padded_queries(query, rows)
    k, v = (_per_head(t, num_heads).to(q.dtype) for t in gather_pages(kv_cache, rows))
    attended = F.scaled_dot_product_attention(q.transpose(1, 2), k, v,
                                              attn_mask=_key_mask(rows, query.device),
                                              scale=scale)  # [B, H, M, D]
    out[:n] = attended.transpose(1, 2)[request, slot].reshape(out[:n].shape).to(out.dtype)
    return out


@dataclass
class DeltaRows:
    """DyLLM's approximate attention in a sparse layer (arXiv:2603.08026; the attention
    layer and `attention_sparse_varlen` kernel of younjoo0614/DyLLM). Query rows
    `exact` [N] get exact attention; every other row keeps its cached `context`
    [N, H, D] and adds softmax(q Kᵀ · scale) · ΔV, ΔV being the change this layer
    makes to the values (zero except at the refreshed rows). The layer writes K/V for
    the query rows `refreshed` (indices, ascending: the K/V rows in order); `positions`
    [N] are the rows' key indices in their requests. `max_refreshed` and `max_exact`
    bound those rows per request (host)."""

    positions: torch.Tensor
    refreshed: torch.Tensor
    exact: torch.Tensor
    context: torch.Tensor
    max_refreshed: int
    max_exact: int


def _first(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices [B, count] of the True entries of each row of `mask` [B, M], in order, then
    of False ones (padding) where a row has fewer than `count`."""
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :count]


def approximate_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          value_change: torch.Tensor, rows: PagedRows, delta: DeltaRows,
                          scale: float, out: torch.Tensor) -> torch.Tensor:
    """`DeltaRows`' attention for query [N, H, D], laid out as `rows` says, over each
    request's `key`, `value` [B, H_kv, L, D] (`gather_pages`, after this layer's writes);
    `value_change` [len(refreshed), H_kv, D] is new minus old V of the refreshed rows.

    The scores are computed for every row and key; the value products only for the
    exact rows (over every key) and for the others over the refreshed keys, so a
    layer where few rows change does a fraction of the exact call's second product.
    """
    n, num_heads, head_size = query.shape
    if n == 0 or rows.seq_lens.shape[0] == 0:
        return out
    q, request, slot = _padded_queries(query, rows)  # [B, M, H, D]
    batch, width = q.shape[:2]

    def padded(values: torch.Tensor) -> torch.Tensor:
        grid = values.new_zeros(batch, width, *values.shape[1:])
        grid[request, slot] = values
        return grid

    k, v = (_per_head(t, num_heads).to(q.dtype) for t in (key, value))
    scores = q.transpose(1, 2) @ k.transpose(2, 3) * scale  # [B, H, M, L]
    scores = scores.masked_fill(~_key_mask(rows, query.device), float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)

    exact = padded(delta.exact)
    chosen = _first(exact, delta.max_exact)  # [B, X]
    exact_rows = weights.gather(2, chosen[:, None, :, None].expand(-1, num_heads, -1,
                                                                  weights.shape[3]))
    exact_out = (exact_rows @ v).transpose(1, 2)  # [B, X, H, D]

    refreshed = torch.zeros(n, dtype=torch.bool, device=query.device)
    refreshed[delta.refreshed] = True
    change = query.new_zeros(n, *value_change.shape[1:])
    change[delta.refreshed] = value_change.to(q.dtype)
    keys = _first(padded(refreshed), delta.max_refreshed)  # [B, S]
    change = _per_head(padded(change).gather(
        1, keys[:, :, None, None].expand(-1, -1, *change.shape[1:])).transpose(1, 2), num_heads)
    at_keys = padded(delta.positions).gather(1, keys)  # [B, S] key indices
    moved = weights.gather(3, at_keys[:, None, None, :].expand(-1, num_heads, width, -1))
    cached = padded(delta.context.view(n, num_heads, head_size).to(q.dtype))
    approximate = cached + (moved @ change).transpose(1, 2)

    result = approximate.scatter(1, chosen[:, :, None, None].expand_as(exact_out), exact_out)
    result = torch.where(exact[:, :, None, None], result, approximate)
    out[:n] = result[request, slot].reshape(out[:n].shape).to(out.dtype)
    return out


if triton is not None:

    @triton.jit
    def _paged_attention_kernel(
        q_ptr, stride_qt, stride_qh,
        kv_ptr, stride_kb, stride_kh, stride_ks, stride_kd,
        out_ptr, stride_ot, stride_oh,
        query_start_loc_ptr, seq_lens_ptr, block_table_ptr, stride_bt,
        scale, block_size, group,
        HEAD_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """One program: BLOCK_M query rows of one request, one head, all its keys."""
        tile = tl.program_id(0)
        req = tl.program_id(1)
        head = tl.program_id(2)
        kv_head = head // group
        q_start = tl.load(query_start_loc_ptr + req)
        q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
        if tile * BLOCK_M >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + req)

        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_SIZE)
        row_ok = offs_m < q_len
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_SIZE], dtype=tl.float32)
        table = block_table_ptr + req.to(tl.int64) * stride_bt
        for start in range(0, seq_len, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            key_ok = offs_n < seq_len
            page = tl.load(table + offs_n // block_size, mask=key_ok, other=0).to(tl.int64)
            base = kv_ptr + page * stride_kb + kv_head * stride_kh + (offs_n % block_size) * stride_ks
            k = tl.load(base[None, :] + offs_d[:, None] * stride_kd, mask=key_ok[None, :], other=0.0)
            v = tl.load(base[:, None] + (HEAD_SIZE + offs_d[None, :]) * stride_kd,
                        mask=key_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, k.to(q.dtype), input_precision="ieee")
            else:
                s = tl.dot(q, k.to(q.dtype))
            s = tl.where(key_ok[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_attention_triton(query: torch.Tensor, kv_cache: torch.Tensor, rows: PagedRows,
                           scale: float, out: torch.Tensor) -> torch.Tensor:
    """Same contract as `paged_attention_torch`, one Triton launch that reads K/V in place.

    Grid: (query tiles of `max_query_len`, requests, heads); each program runs an
    online softmax over its request's keys, a tile of keys at a time, each key's
    page looked up in the block table. fp32 inputs use IEEE dot products.
    """
    if triton is None:
        raise RuntimeError("paged_attention_triton needs triton")
    n, num_heads, head_size = query.shape
    batch, max_query_len = rows.seq_lens.shape[0], rows.max_query_len
    assert head_size >= 16 and head_size & (head_size - 1) == 0, \
        f"the Triton kernel needs a power-of-two head size >= 16, got {head_size}"
    num_kv_heads = kv_cache.shape[1]
    assert num_heads % num_kv_heads == 0 and kv_cache.shape[3] == 2 * head_size
    if n == 0 or batch == 0 or max_query_len == 0:
        return out
    assert query.stride(-1) == 1
    o = out[:n].view(n, num_heads, head_size)
    assert o.stride(-1) == 1
    block_m = 16 if max_query_len <= 16 else (32 if max_query_len <= 32 else 64)
    block_n = 64 if head_size <= 64 else 32
    grid = (triton.cdiv(max_query_len, block_m), batch, num_heads)
    _paged_attention_kernel[grid](
        query, query.stride(0), query.stride(1),
        kv_cache, *kv_cache.stride(),
        o, o.stride(0), o.stride(1),
        rows.query_start_loc, rows.seq_lens, rows.block_table, rows.block_table.stride(0),
        float(scale), kv_cache.shape[2], num_heads // num_kv_heads,
        HEAD_SIZE=head_size, BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=query.dtype == torch.float32,
        num_warps=4,
    )
    return out


def triton_serves(device_type: str, head_size: int) -> bool:
    """Whether `paged_attention` runs the Triton kernel: CUDA tensors, triton installed,
    a power-of-two head size >= 16 (the kernel's `tl.arange` over the head)."""
    return (device_type == "cuda" and triton is not None and head_size >= 16
            and head_size & (head_size - 1) == 0)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, rows: PagedRows, scale: float,
                    out: torch.Tensor) -> torch.Tensor:
    """The Triton kernel where `triton_serves`, the torch path otherwise."""
    use_triton = triton_serves(query.device.type, query.shape[-1])
    kernel = paged_attention_triton if use_triton else paged_attention_torch
    return kernel(query, kv_cache, rows, scale, out)
