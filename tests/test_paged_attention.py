"""paged_attention.py's two paths against dense per-request attention.

The problem: several requests of different lengths over shuffled, non-contiguous
pages, every position first holding a stale K/V, then a pass that writes fresh K/V
for a random non-contiguous subset of rows (none for one request) and attends from
exactly those rows. The Triton kernel is checked under TRITON_INTERPRET=1 in a
subprocess (the variable must be set before triton is imported).
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vllm_dllm.attention_backends.paged_attention import (
    paged_attention,
    paged_attention_torch,
    write_kv,
)

ROOT = Path(__file__).resolve().parents[1]


def dense_attention(q, k, v, scale):
    """q [n, H, D] against one request's whole k, v [L, Hkv, D], no mask."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                          v.transpose(0, 1), scale=scale).transpose(0, 1)


def make_problem(num_heads, num_kv_heads, head, block_size, lengths, seed, dtype=torch.float32):
    """Pages, metadata and the dense answer for one pass over `lengths` requests."""
    g = torch.Generator().manual_seed(seed)
    pages_needed = sum(-(-n // block_size) for n in lengths)
    num_blocks = pages_needed + 7
    kv_cache = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head, generator=g).to(dtype)
    free_pages = torch.randperm(num_blocks, generator=g)  # shuffled; padding pages hold junk
    tables, used = [], 0
    for n in lengths:
        pages = -(-n // block_size)
        tables.append(free_pages[used : used + pages])
        used += pages
    width = max(len(t) for t in tables) + 1  # a spare column, as real block tables have
    block_table = torch.zeros(len(lengths), width, dtype=torch.int32)
    for b, t in enumerate(tables):
        block_table[b, : len(t)] = t

    def slots(b, positions):
        return tables[b][positions // block_size] * block_size + positions % block_size

    stale_k = [torch.randn(n, num_kv_heads, head, generator=g).to(dtype) for n in lengths]
    stale_v = [torch.randn(n, num_kv_heads, head, generator=g).to(dtype) for n in lengths]
    for b, n in enumerate(lengths):
        write_kv(kv_cache, slots(b, torch.arange(n)), stale_k[b], stale_v[b])

    subsets = [torch.sort(torch.randperm(n, generator=g)[: max(1, n // 3)]).values for n in lengths]
    subsets[1] = subsets[1][:0]  # a request with no query rows in this pass
    fresh_k = [torch.randn(len(s), num_kv_heads, head, generator=g).to(dtype) for s in subsets]
    fresh_v = [torch.randn(len(s), num_kv_heads, head, generator=g).to(dtype) for s in subsets]
    write_kv(kv_cache, torch.cat([slots(b, s) for b, s in enumerate(subsets)]),
             torch.cat(fresh_k), torch.cat(fresh_v))

    # Queries as a strided view (the model's packed projection), rows grouped by request.
    rows = sum(len(s) for s in subsets)
    packed = torch.randn(rows, num_heads + 1, head, generator=g).to(dtype)
    query = packed[:, 1:]
    starts = [0]
    for s in subsets:
        starts.append(starts[-1] + len(s))
    scale = head**-0.5
    want = torch.zeros(rows, num_heads, head, dtype=torch.float32)
    for b, s in enumerate(subsets):
        k, v = stale_k[b].clone(), stale_v[b].clone()
        k[s], v[s] = fresh_k[b], fresh_v[b]
        want[starts[b] : starts[b + 1]] = dense_attention(query[starts[b] : starts[b + 1]].float(),
                                                           k.float(), v.float(), scale)
    args = dict(query=query, kv_cache=kv_cache, scale=scale, rows=SimpleNamespace(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lengths, dtype=torch.int32), block_table=block_table,
        max_query_len=max(len(s) for s in subsets), max_seq_len=max(lengths)))
    return args, want


CASES = [  # heads, kv heads, head size, page size, request lengths
    (4, 4, 32, 16, [37, 5, 64, 100]),
    (8, 2, 64, 8, [3, 40, 129, 17, 1]),
    (4, 1, 128, 32, [70, 9, 33]),
    (2, 2, 32, 1, [12, 6, 20]),
]


@pytest.mark.parametrize("num_heads, num_kv_heads, head, block_size, lengths", CASES)
def test_torch_path_matches_dense(num_heads, num_kv_heads, head, block_size, lengths):
    args, want = make_problem(num_heads, num_kv_heads, head, block_size, lengths, seed=head + block_size)
    out = torch.full((len(want), num_heads * head), float("nan"))  # flat, as the layer hands it over
    paged_attention_torch(out=out, **args)
    torch.testing.assert_close(out.view_as(want), want, rtol=1e-5, atol=1e-5)
    out2 = torch.full_like(want, float("nan"))
    paged_attention(out=out2, **args)  # CPU tensors dispatch to the torch path
    torch.testing.assert_close(out2, want, rtol=1e-5, atol=1e-5)


def test_torch_path_odd_head_size_and_empty_pass():
    args, want = make_problem(3, 1, 24, 16, [30, 8, 50], seed=1)
    out = torch.empty_like(want)
    paged_attention_torch(out=out, **args)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    empty = dict(args, query=args["query"][:0], rows=SimpleNamespace(
        **{**vars(args["rows"]), "query_start_loc": torch.zeros(4, dtype=torch.int32),
           "max_query_len": 0}))
    paged_attention_torch(out=out[:0], **empty)


def check_triton(dtype_name: str = "float32") -> None:
    """Run in a subprocess with TRITON_INTERPRET=1: the kernel on CPU tensors against dense."""
    from vllm_dllm.attention_backends.paged_attention import paged_attention_triton

    dtype = getattr(torch, dtype_name)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for i, (num_heads, num_kv_heads, head, block_size, lengths) in enumerate(CASES):
        args, want = make_problem(num_heads, num_kv_heads, head, block_size, lengths, seed=i, dtype=dtype)
        out = torch.full((len(want), num_heads * head), float("nan"), dtype=dtype)
        paged_attention_triton(out=out, **args)
        torch.testing.assert_close(out.view_as(want).float(), want, rtol=tol, atol=tol)
    # More query rows than one tile holds (several tiles per request).
    args, want = make_problem(2, 1, 32, 16, [300, 4, 200], seed=9, dtype=dtype)
    out = torch.empty(len(want), 2, 32, dtype=dtype)
    paged_attention_triton(out=out, **args)
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    with pytest.raises(AssertionError, match="power-of-two"):
        args, _ = make_problem(2, 1, 24, 16, [10, 3, 4], seed=0, dtype=dtype)
        paged_attention_triton(out=torch.empty_like(args["query"]), **args)
    print("triton ok")


def run_interpreted(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_kernel_interpreted_matches_dense(dtype):
    pytest.importorskip("triton")
    done = run_interpreted(f"from tests.test_paged_attention import check_triton; check_triton({dtype!r})")
    assert done.returncode == 0 and "triton ok" in done.stdout, done.stdout + done.stderr


def test_module_imports_without_vllm():
    """paged_attention.py runs where vLLM is not installed (a GPU box with torch + triton)."""
    code = ("import sys; import vllm_dllm.attention_backends.paged_attention; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
