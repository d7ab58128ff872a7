"""The paged bidirectional attention backend against dense attention, on whichever kernel
the layer's shapes select (vLLM's CPU kernel or `paged_attention`)."""

import pytest
import torch
import torch.nn.functional as F

from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_dllm.attention_backends.bidirectional import (
    CPU_KERNEL,
    CPU_KERNEL_APPROXIMATE,
    FLASH,
    TORCH,
    TORCH_APPROXIMATE,
    TRITON,
    BidirectionalAttentionBackend,
    BidirectionalAttentionImpl,
    BidirectionalMetadata,
    _cpu_kernel_isa,
    _layer_kernels,
    select_kernels,
)
from vllm_dllm.attention_backends.paged_attention import DeltaRows


def dense_attention(q, k, v, scale):
    """q [n, H, D] against one request's full k, v [L, Hkv, D], no mask."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                          v.transpose(0, 1), scale=scale).transpose(0, 1)


def qkv_views(rows: int, num_heads: int, num_kv_heads: int, head: int, g):
    """q, k, v as the model hands them over: strided views into one packed projection."""
    qkv = torch.randn(rows, (num_heads + 2 * num_kv_heads) * head, generator=g)
    q, k, v = qkv.split([num_heads * head, num_kv_heads * head, num_kv_heads * head], -1)
    return (q.view(rows, num_heads, head), k.view(rows, num_kv_heads, head),
            v.view(rows, num_kv_heads, head))


# (heads, kv heads, head size, page size, kernel the shapes select on x86)
CASES = [(4, 4, 16, 16, None), (8, 2, 16, 8, None), (2, 1, 16, 32, None),
         (4, 4, 32, 32, "vec"), (8, 2, 64, 32, "vec"), (4, 2, 32, 16, "vec16"),
         (4, 4, 128, 64, "vec"), (4, 2, 32, 8, None)]


@pytest.mark.parametrize("num_heads, num_kv_heads, head, block_size, isa", CASES)
def test_random_query_subsets_match_dense(num_heads, num_kv_heads, head, block_size, isa):
    g = torch.Generator().manual_seed(num_heads * 100 + block_size + head)
    num_blocks = 64
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head)
    assert _cpu_kernel_isa("cpu", head, kv_cache.dtype, tuple(kv_cache.shape),
                           tuple(kv_cache.stride())) == isa
    free_pages = torch.randperm(num_blocks - 1, generator=g) + 1
    impl = BidirectionalAttentionImpl(num_heads, head, head**-0.5, num_kv_heads)
    scale = head**-0.5

    lengths = [37, 5, 64, 100]
    tables, used = [], 0
    for n in lengths:  # non-contiguous, shuffled pages per request
        pages = -(-n // block_size)
        tables.append(free_pages[used : used + pages])
        used += pages
    block_table = torch.zeros(len(lengths), max(len(t) for t in tables), dtype=torch.int32)
    for i, t in enumerate(tables):
        block_table[i, : len(t)] = t

    def slot(b, p):
        return tables[b][p // block_size] * block_size + p % block_size

    def run(subsets):
        """One pass computing rows `subsets[b]` of each request; returns q, k, v, output."""
        starts = [0]
        for s in subsets:
            starts.append(starts[-1] + len(s))
        query, key, value = qkv_views(starts[-1], num_heads, num_kv_heads, head, g)
        metadata = BidirectionalMetadata(
            num_actual_tokens=starts[-1],
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(lengths, dtype=torch.int32), block_table=block_table,
            slot_mapping=torch.cat([torch.stack([slot(b, int(p)) for p in s]).long()
                                    if len(s) else torch.zeros(0, dtype=torch.long)
                                    for b, s in enumerate(subsets)]),
            max_query_len=max(len(s) for s in subsets), max_seq_len=max(lengths))
        output = torch.empty(starts[-1], num_heads * head)
        impl.forward(None, query, key, value, kv_cache, metadata, output)
        split = [starts[b + 1] - starts[b] for b in range(len(subsets))]
        return (query.split(split), key.split(split), value.split(split),
                output.view(-1, num_heads, head).split(split))

    # Pass 1 computes every position: what it writes is the stale K/V of pass 2.
    q, stale_k, stale_v, out = run([torch.arange(n) for n in lengths])
    for b in range(len(lengths)):
        want = dense_attention(q[b], stale_k[b], stale_v[b], scale)
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)

    # Pass 2 recomputes a random, non-contiguous subset of each request (none of one).
    subsets = [torch.sort(torch.randperm(n, generator=g)[: max(1, n // 3)]).values for n in lengths]
    subsets[1] = subsets[1][:0]
    q, fresh_k, fresh_v, out = run(subsets)
    for b, s in enumerate(subsets):
        if not len(s):
            continue
        k_now, v_now = stale_k[b].clone(), stale_v[b].clone()
        k_now[s], v_now[s] = fresh_k[b], fresh_v[b]  # fresh where recomputed
        want = dense_attention(q[b], k_now, v_now, scale)
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads, num_kv_heads, head, block_size, isa", CASES)
def test_dyllm_approximate_attention_matches_its_definition(num_heads, num_kv_heads, head,
                                                            block_size, isa):
    """A `DeltaRows` layer on either page layout: exact rows attend exactly to the K/V after
    this layer's writes; every other row is its cached context plus softmax(q Kᵀ) · ΔV."""
    g = torch.Generator().manual_seed(7 * num_heads + block_size + head)
    lengths = [37, 5, 64]
    num_blocks = 32
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head)
    pages = [-(-n // block_size) for n in lengths]
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    block_table = torch.zeros(len(lengths), max(pages), dtype=torch.int32)
    for b, n in enumerate(pages):
        block_table[b, :n] = torch.tensor(order[sum(pages[:b]): sum(pages[:b]) + n])
    impl = BidirectionalAttentionImpl(num_heads, head, head**-0.5, num_kv_heads)
    scale = head**-0.5

    def slots(b, positions):
        return torch.stack([block_table[b, p // block_size].long() * block_size + p % block_size
                            for p in positions.tolist()]) if len(positions) else \
            torch.zeros(0, dtype=torch.long)

    def metadata(subsets, kv_slots, delta=None):
        starts = [0]
        for s in subsets:
            starts.append(starts[-1] + len(s))
        return BidirectionalMetadata(
            num_actual_tokens=starts[-1], query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(lengths, dtype=torch.int32), block_table=block_table,
            slot_mapping=kv_slots, max_query_len=max(len(s) for s in subsets),
            max_seq_len=max(lengths), delta=delta)

    # A full pass fills the pages: the old K/V.
    full = [torch.arange(n) for n in lengths]
    q, old_k, old_v = qkv_views(sum(lengths), num_heads, num_kv_heads, head, g)
    impl.forward(None, q, old_k, old_v, kv_cache,
                 metadata(full, torch.cat([slots(b, s) for b, s in enumerate(full)])),
                 torch.empty(sum(lengths), num_heads * head))
    old_k, old_v = old_k.split(lengths), old_v.split(lengths)

    # The sparse pass: query rows, refreshed rows among them (none in one request), and
    # the exact rows: the refreshed ones and a few more.
    queries = [torch.sort(torch.randperm(n, generator=g)[: max(2, n // 2)]).values for n in lengths]
    refreshed_mask = [torch.rand(len(s), generator=g) < 0.3 for s in queries]
    refreshed_mask[1][:] = False
    exact_mask = [r | (torch.rand(len(r), generator=g) < 0.2) for r in refreshed_mask]
    n = sum(len(s) for s in queries)
    query = torch.randn(n, num_heads, head, generator=g)
    refreshed = torch.cat(refreshed_mask).nonzero().flatten()
    key, value = (torch.randn(len(refreshed), num_kv_heads, head, generator=g) for _ in range(2))
    context = torch.randn(n, num_heads * head, generator=g)
    positions = torch.cat(queries)
    request = torch.cat([torch.full((len(s),), b) for b, s in enumerate(queries)])
    kv_slots = torch.cat([slots(int(request[r]), positions[r:r + 1]) for r in refreshed.tolist()]
                         or [torch.zeros(0, dtype=torch.long)])
    delta = DeltaRows(positions=positions, refreshed=refreshed, exact=torch.cat(exact_mask),
                      context=context, max_refreshed=max(int(r.sum()) for r in refreshed_mask),
                      max_exact=max(int(e.sum()) for e in exact_mask))
    out = torch.empty(n, num_heads, head)  # as vLLM's `Attention` hands it over
    impl.forward(None, query, key, value, kv_cache, metadata(queries, kv_slots, delta), out)
    out = out.flatten(1)

    group = num_heads // num_kv_heads
    for r in range(n):
        b, pos = int(request[r]), int(positions[r])
        k_now, v_now = old_k[b].clone(), old_v[b].clone()
        change = torch.zeros_like(v_now)
        for j, row in enumerate(refreshed.tolist()):
            if int(request[row]) == b:
                p = int(positions[row])
                k_now[p], v_now[p] = key[j], value[j]
                change[p] = value[j] - old_v[b][p]
        if bool(delta.exact[r]):
            want = dense_attention(query[r:r + 1], k_now, v_now, scale)[0].flatten()
        else:
            weights = torch.softmax(torch.einsum("hd,lhd->hl", query[r],
                                                 k_now.repeat_interleave(group, 1)) * scale, -1)
            want = context[r] + torch.einsum("hl,lhd->hd", weights,
                                             change.repeat_interleave(group, 1)).flatten()
        torch.testing.assert_close(out[r], want, rtol=1e-5, atol=1e-5)


def test_cpu_kernel_needs_packed_blocks():
    """A cache whose heads are not outside its slots (vLLM's NHD default) uses paged_attention."""
    nhd = torch.zeros(8, 32, 4, 64).transpose(1, 2)  # logical [blocks, heads, slots, 2D]
    assert _cpu_kernel_isa("cpu", 32, nhd.dtype, tuple(nhd.shape), tuple(nhd.stride())) is None
    assert _cpu_kernel_isa("cuda", 32, torch.float32, (8, 4, 32, 64), (8192, 2048, 64, 1)) is None


# (device, dtype, head size, page size, FlashAttention version vLLM reports, CPU ISA found,
#  kernel of exact passes, kernel of DyLLM's approximate passes)
SELECTION = [
    # LLaDA-8B / Dream on an H100 (FA3) or an A100 (FA2): FlashAttention.
    ("cuda", torch.bfloat16, 128, 16, 3, None, FLASH, TORCH_APPROXIMATE),
    ("cuda", torch.float16, 128, 32, 2, None, FLASH, TORCH_APPROXIMATE),
    ("cuda", torch.bfloat16, 96, 16, 2, None, FLASH, TORCH_APPROXIMATE),
    # FlashAttention is fp16/bf16 only: float32 runs the Triton kernel.
    ("cuda", torch.float32, 128, 16, 3, None, TRITON, TORCH_APPROXIMATE),
    # Not built, or a GPU below compute capability 8.0 (vLLM reports no version).
    ("cuda", torch.bfloat16, 128, 16, None, None, TRITON, TORCH_APPROXIMATE),
    # Pages FlashAttention cannot read (not a multiple of 16), head sizes it lacks.
    ("cuda", torch.bfloat16, 128, 8, 3, None, TRITON, TORCH_APPROXIMATE),
    ("cuda", torch.bfloat16, 264, 16, 2, None, TORCH, TORCH_APPROXIMATE),
    # Neither FlashAttention (none) nor Triton (head size not a power of two).
    ("cuda", torch.bfloat16, 96, 16, None, None, TORCH, TORCH_APPROXIMATE),
    # CPUs: vLLM's kernel where it fits, our torch path elsewhere; never FlashAttention.
    ("cpu", torch.float32, 128, 16, None, "vec16", CPU_KERNEL, CPU_KERNEL_APPROXIMATE),
    ("cpu", torch.bfloat16, 128, 32, 3, "vec", CPU_KERNEL, CPU_KERNEL_APPROXIMATE),
    ("cpu", torch.float32, 8, 16, None, None, TORCH, TORCH_APPROXIMATE),
]


@pytest.mark.parametrize("device, dtype, head, block_size, flash, isa, exact, approximate",
                         SELECTION)
def test_kernel_selection(device, dtype, head, block_size, flash, isa, exact, approximate):
    if exact == TRITON:
        pytest.importorskip("triton")
    kernels = select_kernels(device, dtype, head, block_size, flash, isa)
    assert (kernels.exact, kernels.approximate) == (exact, approximate)
    assert kernels.flash_version == (flash if exact == FLASH else None)
    assert kernels.cpu_isa == isa


def test_layer_kernels_follow_the_cache_view():
    """The forward's choice comes from the cache it is handed: vLLM's CPU layout (heads
    outside slots) gets vLLM's CPU kernel, the CUDA layout's strides do not."""
    lbhnc = torch.zeros(4, 2, 32, 64)
    lbnhc = torch.zeros(4, 32, 2, 64).transpose(1, 2)
    assert _layer_kernels("cpu", torch.float32, 32, tuple(lbhnc.shape),
                          tuple(lbhnc.stride())).exact == CPU_KERNEL
    assert _layer_kernels("cpu", torch.float32, 32, tuple(lbnhc.shape),
                          tuple(lbnhc.stride())).exact == TORCH
    assert BidirectionalAttentionBackend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
