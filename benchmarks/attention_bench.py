"""The attention call alone: one batched call against the per-request loop it replaced,
side by side in one run, at LLaDA-8B's attention shapes (no vLLM needed).

    python -m benchmarks.attention_bench --out benchmarks/results/attention
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_dllm.attention_backends.paged_attention import paged_attention, read_kv

HEADS, HEAD_DIM, PAGE = 32, 128, 16  # LLaDA-8B: 32 heads (no GQA), head_dim 128


def per_request_loop(query, kv_cache, starts, seq_lens, block_table, scale, out):
    """The replaced path: gather each request's whole K/V, one SDPA call per request."""
    for b, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = int(starts[b]), int(starts[b + 1])
        k, v = read_kv(kv_cache, block_table[b], seq_len)
        q = query[lo:hi].transpose(0, 1)
        out[lo:hi] = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1)
    return out


def run(requests: int, rows: int, keys: int, repeats: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    pages = keys // PAGE
    kv_cache = torch.randn(requests * pages + 3, HEADS, PAGE, 2 * HEAD_DIM, generator=g).to(device)
    block_table = torch.randperm(requests * pages, generator=g).view(requests, pages).to(device)
    query = torch.randn(requests * rows, HEADS, HEAD_DIM, generator=g).to(device)
    starts = torch.arange(0, requests * rows + 1, rows, dtype=torch.int32, device=device)
    seq_lens = torch.full((requests,), keys, dtype=torch.int32, device=device)
    out = torch.empty_like(query)
    scale = HEAD_DIM**-0.5

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    batched = timed(lambda: paged_attention(query, kv_cache, starts, seq_lens, block_table, scale,
                                            rows, keys, out))
    want = out.clone()
    loop = timed(lambda: per_request_loop(query, kv_cache, starts, seq_lens, block_table, scale,
                                          out))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    return {"device": str(device), "requests": requests, "query_rows": rows, "keys": keys,
            "batched_ms": batched, "loop_ms": loop, "speedup": loop / batched}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention"))
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results = [run(b, 32, 512, args.repeats, torch.device("cpu"))
               for b in map(int, args.batch_sizes.split(","))]
    if torch.cuda.is_available():
        results += [run(b, 32, 512, args.repeats, torch.device("cuda")) for b in (16, 64)]
    lines = ["# Attention call per layer: 32 query rows per request over 512 keys, "
             f"{HEADS} heads, head_dim {HEAD_DIM}, pages of {PAGE}", "",
             "| device | requests | batched ms | per-request loop ms | speed-up |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['device']} | {r['requests']} | {r['batched_ms']:.2f} | "
                     f"{r['loop_ms']:.2f} | {r['speedup']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention.json").write_text(json.dumps(results, indent=2))
    (args.out / "attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
