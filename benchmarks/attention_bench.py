"""The attention call of one layer alone, side by side in one run, at LLaDA-8B's attention
shapes (32 heads, no GQA, head_dim 128), 32 query rows per request over 512 keys.

CPU: the per-request loop the backend used to run (reimplemented below), the batched torch
path (`paged_attention_torch`, one padded SDPA call) and, when vLLM's CPU ops are importable,
vLLM's CPU kernel as the backend calls it (scheduler metadata + one non-causal call).
CUDA (when present): the Triton kernel reading the pages in place, the same loop, and flash
SDPA over contiguous K/V (no pages: the lower bound a paged kernel is compared with).
vLLM is imported only for the CPU kernel's rows, so the GPU part runs with torch + triton.

    python -m benchmarks.attention_bench --out benchmarks/results/attention
"""

import argparse
import json
import platform
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks.timing import timed

from vllm_dllm.attention_backends.paged_attention import (
    paged_attention_torch,
    paged_attention_triton,
    write_kv,
)

HEADS, HEAD_DIM = 32, 128  # LLaDA-8B: 32 heads (no GQA), head_dim 128
ROWS, KEYS = 32, 512


def read_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """All K/V of one request: two [num_kv_heads, seq_len, head_size] tensors."""
    num_kv_heads, block_size, width = kv_cache.shape[1:]
    num_blocks = -(-seq_len // block_size)
    pages = kv_cache[block_ids[:num_blocks].long()]
    kv = pages.transpose(0, 1).reshape(num_kv_heads, num_blocks * block_size, width)[:, :seq_len]
    return kv[..., : width // 2], kv[..., width // 2 :]


def per_request_loop(query, kv_cache, starts, seq_lens, block_table, scale, out):
    """The replaced path: gather each request's whole K/V, one SDPA call per request."""
    for b, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = int(starts[b]), int(starts[b + 1])
        k, v = read_kv(kv_cache, block_table[b], seq_len)
        q = query[lo:hi].transpose(0, 1)
        out[lo:hi] = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1)
    return out


def vllm_cpu_ops():
    """vLLM's CPU attention ops, or None where vLLM (or its CPU build) is not installed."""
    try:
        from vllm import _custom_ops as ops
        from vllm import envs
    except ImportError:
        return None
    if not hasattr(torch.ops._C, "cpu_attention_with_kv_cache"):
        return None
    return ops, envs


def problem(requests: int, page: int, device: torch.device, dtype: torch.dtype):
    """Shuffled pages holding every request's K/V (also kept contiguous), queries, metadata."""
    g = torch.Generator().manual_seed(0)
    pages = KEYS // page
    k = torch.randn(requests, KEYS, HEADS, HEAD_DIM, generator=g).to(device, dtype)
    v = torch.randn(requests, KEYS, HEADS, HEAD_DIM, generator=g).to(device, dtype)
    block_table = torch.randperm(requests * pages + 3, generator=g)[: requests * pages]
    block_table = block_table.view(requests, pages).to(device, torch.int32)
    slots = (block_table.long()[:, :, None] * page + torch.arange(page, device=device)).view(-1)
    kv_cache = torch.zeros(requests * pages + 3, HEADS, page, 2 * HEAD_DIM, device=device, dtype=dtype)
    write_kv(kv_cache, slots, k.view(-1, HEADS, HEAD_DIM), v.view(-1, HEADS, HEAD_DIM))
    query = torch.randn(requests * ROWS, HEADS, HEAD_DIM, generator=g).to(device, dtype)
    return dict(
        k=k, v=v, slots=slots, kv_cache=kv_cache, block_table=block_table, query=query,
        starts=torch.arange(0, requests * ROWS + 1, ROWS, dtype=torch.int32, device=device),
        seq_lens=torch.full((requests,), KEYS, dtype=torch.int32, device=device))


def cpu_row(requests: int, page: int, repeats: int) -> dict:
    device, scale = torch.device("cpu"), HEAD_DIM**-0.5
    p = problem(requests, page, device, torch.float32)
    query, starts, seq_lens, block_table = p["query"], p["starts"], p["seq_lens"], p["block_table"]
    out = torch.empty_like(query)

    loop = timed(lambda: per_request_loop(query, p["kv_cache"], starts, seq_lens, block_table,
                                          scale, out), repeats, device)
    want = out.clone()
    rows = SimpleNamespace(query_start_loc=starts, seq_lens=seq_lens, block_table=block_table,
                           max_query_len=ROWS, max_seq_len=KEYS)
    batched = timed(lambda: paged_attention_torch(query, p["kv_cache"], rows, scale, out),
                    repeats, device)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    row = {"device": "cpu", "requests": requests, "page": page, "query_rows": ROWS,
           "keys": KEYS, "loop_ms": loop, "batched_torch_ms": batched,
           "loop_over_batched_torch": loop / batched}

    found = vllm_cpu_ops()
    if found is not None and page % 32 == 0:
        ops, envs = found
        # The same K/V in vLLM's own in-page layout, written through its cache op.
        vllm_cache = torch.zeros_like(p["kv_cache"])
        key_cache, value_cache = vllm_cache.view(vllm_cache.shape[0], HEADS, 2 * page,
                                                 HEAD_DIM).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(p["k"].reshape(-1, HEADS, HEAD_DIM),
                                       p["v"].reshape(-1, HEADS, HEAD_DIM), key_cache,
                                       value_cache, p["slots"], "vec")

        def vllm_call():
            scheduler = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=requests, num_heads=HEADS, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                seq_lens=seq_lens, dtype=query.dtype, query_start_loc=starts, causal=False,
                sliding_window_size=-1, isa="vec", enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
            ops.cpu_attention_with_kv_cache(
                query=query, key_cache=key_cache, value_cache=value_cache, output=out,
                query_start_loc=starts, seq_lens=seq_lens, scale=scale, causal=False,
                alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
                scheduler_metadata=scheduler, s_aux=None)

        out.zero_()
        vllm_ms = timed(vllm_call, repeats, device)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        row.update(vllm_cpu_ms=vllm_ms, loop_over_vllm_cpu=loop / vllm_ms,
                   batched_torch_over_vllm_cpu=batched / vllm_ms)
    return row


def gpu_row(requests: int, page: int, repeats: int, device: torch.device,
            dtype: torch.dtype = torch.bfloat16) -> dict:
    scale = HEAD_DIM**-0.5
    p = problem(requests, page, device, dtype)
    query, starts, seq_lens, block_table = p["query"], p["starts"], p["seq_lens"], p["block_table"]
    out = torch.empty_like(query)
    loop = timed(lambda: per_request_loop(query, p["kv_cache"], starts, seq_lens, block_table,
                                          scale, out), repeats, device)
    want = out.float().clone()
    rows = SimpleNamespace(query_start_loc=starts, seq_lens=seq_lens, block_table=block_table,
                           max_query_len=ROWS, max_seq_len=KEYS)
    triton_ms = timed(lambda: paged_attention_triton(query, p["kv_cache"], rows, scale, out),
                      repeats, device)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    # Flash SDPA with every request's K/V contiguous and equal lengths: no pages, no padding.
    q = query.view(requests, ROWS, HEADS, HEAD_DIM).transpose(1, 2)
    k, v = p["k"].transpose(1, 2).contiguous(), p["v"].transpose(1, 2).contiguous()
    backends = []
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION]

    def flash():
        if backends:
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    flash_ms = timed(flash, repeats, device)
    torch.testing.assert_close(flash().transpose(1, 2).reshape_as(out).float(), want,
                               rtol=2e-2, atol=2e-2)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "dtype": str(dtype).removeprefix("torch."), "requests": requests, "page": page,
            "query_rows": ROWS, "keys": KEYS, "loop_ms": loop, "triton_ms": triton_ms,
            "flash_sdpa_contiguous_ms": flash_ms, "loop_over_triton": loop / triton_ms,
            "triton_over_flash": triton_ms / flash_ms}


def markdown(cpu: list[dict], gpu: list[dict]) -> str:
    lines = [f"# Attention call per layer: {ROWS} query rows per request over {KEYS} keys, "
             f"{HEADS} heads, head_dim {HEAD_DIM} (median ms)", ""]
    if cpu:
        lines += [f"CPU ({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads), float32, pages of {cpu[0]['page']}:", "",
                  "| requests | per-request loop | batched torch | vLLM CPU kernel "
                  "| loop / batched torch | loop / vLLM kernel |",
                  "|---|---|---|---|---|---|"]
        for r in cpu:
            v = r.get("vllm_cpu_ms")
            lines.append(f"| {r['requests']} | {r['loop_ms']:.2f} | {r['batched_torch_ms']:.2f} | "
                         + (f"{v:.2f} | " if v else "n/a | ")
                         + f"{r['loop_over_batched_torch']:.2f}x | "
                         + (f"{r['loop_over_vllm_cpu']:.2f}x |" if v else "n/a |"))
    if gpu:
        lines += ["", f"{gpu[0]['device']}, {gpu[0]['dtype']}, pages of {gpu[0]['page']}:", "",
                  "| requests | per-request loop | Triton (paged) | flash SDPA (contiguous K/V) "
                  "| loop / Triton | Triton / flash |",
                  "|---|---|---|---|---|---|"]
        for r in gpu:
            lines.append(f"| {r['requests']} | {r['loop_ms']:.3f} | {r['triton_ms']:.3f} | "
                         f"{r['flash_sdpa_contiguous_ms']:.3f} | {r['loop_over_triton']:.2f}x | "
                         f"{r['triton_over_flash']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention"))
    parser.add_argument("--batch-sizes", default="1,4,16", help="CPU request counts")
    parser.add_argument("--gpu-batch-sizes", default="16,64")
    parser.add_argument("--page", type=int, default=32,
                        help="page size (vLLM's CPU kernel needs a multiple of 32 here)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA rows")
    args = parser.parse_args(argv)
    cpu = [] if args.skip_cpu else [cpu_row(b, args.page, args.repeats)
                                    for b in map(int, args.batch_sizes.split(","))]
    gpu = []
    if torch.cuda.is_available():
        gpu = [gpu_row(b, args.page, args.repeats, torch.device("cuda"))
               for b in map(int, args.gpu_batch_sizes.split(","))]
    text = markdown(cpu, gpu)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention.json").write_text(json.dumps({"cpu": cpu, "cuda": gpu}, indent=2))
    (args.out / "attention.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
