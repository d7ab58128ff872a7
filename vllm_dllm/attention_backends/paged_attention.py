"""Non-causal attention of arbitrary query rows over paged K/V, one call for a whole batch.

No vLLM imports: this module is what runs on the model's device, and it can be
tested and timed on its own. Page layout: [num_blocks, num_kv_heads, block_size,
2 * head_size], K in the first half of the last axis and V in the second.
"""

import torch
import torch.nn.functional as F


def write_kv(kv_cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Store K/V rows [N, num_kv_heads, head_size] at their cache slots."""
    block_size, head_size = kv_cache.shape[2], key.shape[-1]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, :, offsets, :head_size] = key
    kv_cache[blocks, :, offsets, head_size:] = value


def read_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All K/V of one request: two [num_kv_heads, seq_len, head_size] tensors."""
    num_kv_heads, block_size, width = kv_cache.shape[1:]
    num_blocks = -(-seq_len // block_size)
    pages = kv_cache[block_ids[:num_blocks]]
    kv = pages.transpose(0, 1).reshape(num_kv_heads, num_blocks * block_size, width)[:, :seq_len]
    return kv[..., : width // 2], kv[..., width // 2 :]


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[t] = softmax(q_t K_b^T * scale) V_b over every position < seq_lens[b] of t's request b.

    query [N, H, D] with request b's rows at `query_start_loc[b]:query_start_loc[b+1]`;
    `block_table` [B, pages]. One padded scaled-dot-product call for the batch: the
    queries are laid out [B, H, max_query_len, D], each request's pages gathered to
    [B, H_kv, max_seq_len, D] and the padding keys masked out.
    """
    n, num_heads, head_size = query.shape
    batch = len(seq_lens)
    if n == 0 or batch == 0:
        return out
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    device = query.device
    starts = query_start_loc[:-1].long()
    lengths = query_start_loc[1:].long() - starts
    request = torch.repeat_interleave(torch.arange(batch, device=device), lengths, output_size=n)
    slot = torch.arange(n, device=device) - starts[request]

    q = query.new_zeros(batch, max_query_len, num_heads, head_size)
    q[request, slot] = query
    pages = -(-max_seq_len // block_size)
    # One gather, heads first, so that the per-request view below needs no second copy.
    kv = kv_cache.transpose(0, 1)[:, block_table[:, :pages].long()]  # [H_kv, B, pages, block, 2D]
    kv = kv.reshape(num_kv_heads, batch, pages * block_size, 2 * head_size).transpose(0, 1)
    k, v = kv[..., :max_seq_len, :head_size], kv[..., :max_seq_len, head_size:]
    if num_heads != num_kv_heads:
        group = num_heads // num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    keys = torch.arange(max_seq_len, device=device)
    mask = (keys[None, :] < seq_lens[:, None].long())[:, None, None, :]
    attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype),
                                              attn_mask=mask, scale=scale)
    out[:n] = attended.transpose(1, 2)[request, slot].reshape(out[:n].shape).to(out.dtype)
    return out
