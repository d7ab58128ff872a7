"""The paged bidirectional attention against dense masked attention."""

import pytest
import torch
import torch.nn.functional as F

from vllm_dllm.attention_backends.bidirectional import (
    BidirectionalAttentionImpl,
    BidirectionalMetadata,
)


def dense_attention(q, k, v, scale):
    """q [n, H, D] against one request's full k, v [L, Hkv, D], no mask."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                          v.transpose(0, 1), scale=scale).transpose(0, 1)


@pytest.mark.parametrize("num_heads, num_kv_heads, block_size", [(4, 4, 16), (8, 2, 8), (2, 1, 32)])
def test_random_query_subsets_match_dense(num_heads, num_kv_heads, block_size):
    g = torch.Generator().manual_seed(num_heads * 100 + block_size)
    head = 16
    num_blocks = 64
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head)
    free_pages = torch.randperm(num_blocks - 1, generator=g) + 1
    impl = BidirectionalAttentionImpl(num_heads, head, head**-0.5, num_kv_heads)

    lengths = [37, 5, 64, 100]
    keys = [torch.randn(n, num_kv_heads, head, generator=g) for n in lengths]
    values = [torch.randn(n, num_kv_heads, head, generator=g) for n in lengths]
    tables, used = [], 0
    for n in lengths:  # non-contiguous, shuffled pages per request
        pages = -(-n // block_size)
        tables.append(free_pages[used : used + pages])
        used += pages
    block_table = torch.zeros(len(lengths), max(len(t) for t in tables), dtype=torch.long)
    for i, t in enumerate(tables):
        block_table[i, : len(t)] = t

    def slot(b, p):
        return tables[b][p // block_size] * block_size + p % block_size

    # Stale entries first: every position holds an older K/V.
    stale_k = [torch.randn_like(k) for k in keys]
    stale_v = [torch.randn_like(v) for v in values]
    for b, n in enumerate(lengths):
        for p in range(n):
            s = slot(b, p)
            kv_cache[s // block_size, :, s % block_size] = torch.cat([stale_k[b][p], stale_v[b][p]], -1)

    # This pass recomputes a random, non-contiguous subset of each request.
    subsets = [torch.sort(torch.randperm(n, generator=g)[: max(1, n // 3)]).values for n in lengths]
    q = [torch.randn(len(s), num_heads, head, generator=g) for s in subsets]
    query = torch.cat(q)
    key = torch.cat([keys[b][s] for b, s in enumerate(subsets)])
    value = torch.cat([values[b][s] for b, s in enumerate(subsets)])
    starts = [0]
    for s in subsets:
        starts.append(starts[-1] + len(s))
    metadata = BidirectionalMetadata(
        num_actual_tokens=starts[-1], query_start_loc=torch.tensor(starts),
        seq_lens=torch.tensor(lengths), block_table=block_table,
        slot_mapping=torch.cat([torch.stack([slot(b, int(p)) for p in s])
                                for b, s in enumerate(subsets)]),
        max_query_len=max(len(s) for s in subsets), max_seq_len=max(lengths))
    output = torch.empty_like(query)
    impl.forward(None, query, key, value, kv_cache, metadata, output)

    for b, s in enumerate(subsets):
        k_now, v_now = stale_k[b].clone(), stale_v[b].clone()
        k_now[s], v_now[s] = keys[b][s], values[b][s]  # fresh where recomputed
        want = dense_attention(q[b], k_now, v_now, head**-0.5)
        torch.testing.assert_close(output[starts[b] : starts[b + 1]], want, rtol=1e-5, atol=1e-5)
