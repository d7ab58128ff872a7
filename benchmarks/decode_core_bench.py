"""One decoding iteration at LLaDA-8B's vocabulary: the batched core against the per-request
path it replaced, side by side in one run (no vLLM needed; runs on CPU or CUDA).

The per-request path is restated here as it was: each request draws a float64
[block_length, V] array of uniforms from its own CPU generator and takes the Gumbel-max
of its rows, then the rule runs on the batch. The batched core is `DenoiseBatch.step`.

    python -m benchmarks.decode_core_bench --out benchmarks/results/decode_core
"""

import argparse
import json
from pathlib import Path

import torch

from benchmarks.timing import timed
from vllm_dllm.sampling.batch import SpecialTokens, full_blocks
from vllm_dllm.sampling.policies import select_threshold

LLADA_VOCAB = 126464
MASK, EOS, EOT = 126336, 126081, 126348


def per_request_step(logits: torch.Tensor, requests: int, block: int, temperature: float,
                     generators: list[torch.Generator]) -> torch.Tensor:
    """The replaced path: one CPU generator draw and Gumbel-max per request."""
    x0 = torch.empty(requests * block, dtype=torch.long, device=logits.device)
    confidence = torch.empty(requests * block, dtype=torch.float64, device=logits.device)
    log_norm = torch.logsumexp(logits.double(), -1)
    for b in range(requests):
        rows = slice(b * block, (b + 1) * block)
        u = torch.rand((block, logits.shape[-1]), generator=generators[b], dtype=torch.float64)
        noisy = logits[rows].double().exp() / (-u.to(logits.device).log()) ** temperature
        x0[rows] = noisy.argmax(-1)
        confidence[rows] = (logits[rows].gather(-1, x0[rows, None]).squeeze(-1).double()
                            - log_norm[rows]).exp()
    commit = select_threshold(confidence.view(requests, block),
                              torch.full((requests,), 0.9, dtype=torch.float64,
                                         device=logits.device))
    return commit.cpu()


def run(requests: int, block: int, temperature: float, repeats: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((requests * block, LLADA_VOCAB), generator=g).to(device)

    def batched() -> torch.Tensor:
        batch, plan = full_blocks(requests, block, temperature, SpecialTokens(MASK, EOS, EOT),
                                  device)
        return batch.step(plan, logits).cpu()

    generators = [torch.Generator().manual_seed(s) for s in range(requests)]
    new = timed(batched, repeats, device)
    old = timed(lambda: per_request_step(logits, requests, block, temperature, generators),
                repeats, device)
    return {"device": str(device), "requests": requests, "block_length": block,
            "vocab": LLADA_VOCAB, "temperature": temperature, "batched_ms": new,
            "per_request_ms": old, "speedup": old / new}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_core"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [run(args.requests, args.block_length, args.temperature, args.repeats, d)
            for d in devices]
    lines = ["# Decoding core, one iteration", "",
             "| device | requests | block | vocab | T | batched ms | per-request ms | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['requests']} | {r['block_length']} | {r['vocab']} | "
                     f"{r['temperature']} | {r['batched_ms']:.1f} | {r['per_request_ms']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_core.json").write_text(json.dumps(rows, indent=2))
    (args.out / "decode_core.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
