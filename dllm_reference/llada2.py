"""Plain PyTorch LLaDA2 MoE (inclusionAI/LLaDA2.0-mini's `modeling_llada2_moe.py`), the
oracle the plugin's `LLaDA2MoeModelLM` is checked against; no vLLM.

A layer: x + dense(attention(rmsnorm(x))), then + mlp(rmsnorm(x)).
* Attention: one `query_key_value` projection split into q, k, v heads (GQA); per-head
  RMSNorm of q and k (`query_layernorm`, `key_layernorm`); RoPE (NeoX halves) on the first
  `head_dim * partial_rotary_factor` dims of each head, the rest passed through; softmax
  attention under the block-causal mask of LLaDA2's `generate`.
* MLP: layers below `first_k_dense_replace` a SwiGLU of `intermediate_size`; the others a
  mixture of experts (`LLaDA2MoeSparseMoeBlock`): fp32 router logits, sigmoid scores; the
  choice is made on scores + `expert_bias`: experts are cut into `n_group` groups, a group
  scores the sum of its two best, the `topk_group` best groups stay, and the
  `num_experts_per_tok` best experts among them are taken; their weights are their
  unbiased scores, normalised to sum 1 (when more than one is taken) and times
  `routed_scaling_factor`. The shared experts (one SwiGLU of `num_shared_experts *
  moe_intermediate_size`) are added to every row.
* Head: `lm_head` on the final RMSNorm; logits row p predicts position p.

Names are the checkpoint's (`model.word_embeddings.weight`, `model.layers.{i}.attention.
query_key_value.weight`, `...mlp.experts.{e}.gate_proj.weight`, `...mlp.gate.expert_bias`).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dllm_reference.modeling import _rms_norm, _rope


class ReferenceLLaDA2(torch.nn.Module):
    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.w = state_dict
        self.n_heads = config["num_attention_heads"]
        self.n_kv = config.get("num_key_value_heads") or self.n_heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.n_heads
        self.rotary_dim = config.get("rotary_dim") or int(
            self.head_dim * config.get("partial_rotary_factor", 0.5))
        self.eps = config["rms_norm_eps"]

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32
                        ) -> "ReferenceLLaDA2":
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        state = {k: v.to(dtype) for k, v in load_file(str(path / "model.safetensors")).items()}
        return cls(config, state)

    def _swiglu(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        gate = x @ self.w[prefix + "gate_proj.weight"].T
        up = x @ self.w[prefix + "up_proj.weight"].T
        return (torch.nn.functional.silu(gate) * up) @ self.w[prefix + "down_proj.weight"].T

    def _attention(self, i: int, x: torch.Tensor, positions: torch.Tensor,
                   allowed: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{i}.attention."
        qkv = (x @ self.w[p + "query_key_value.weight"].T).view(
            len(x), self.n_heads + 2 * self.n_kv, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        if self.config.get("use_qk_norm", True):
            q = _rms_norm(q, self.w[p + "query_layernorm.weight"], self.eps)
            k = _rms_norm(k, self.w[p + "key_layernorm.weight"], self.eps)
        r = self.rotary_dim
        theta = self.config.get("rope_theta", 10000.0)

        def rotate(t: torch.Tensor) -> torch.Tensor:
            rotated = _rope(t[..., :r].transpose(0, 1), positions, theta, True)
            return torch.cat([rotated.transpose(0, 1), t[..., r:]], dim=-1)

        q, k = rotate(q), rotate(k)
        group = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * self.head_dim**-0.5
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        context = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(len(x), -1)
        return context @ self.w[p + "dense.weight"].T

    def _moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        p = f"model.layers.{i}.mlp."
        logits = x.float() @ self.w[p + "gate.weight"].float().T
        scores = logits.sigmoid()
        biased = scores + self.w[p + "gate.expert_bias"].float()
        n, groups = len(x), c["n_group"]
        group_scores = biased.view(n, groups, -1).topk(2, dim=-1).values.sum(-1)
        kept_groups = group_scores.topk(c["topk_group"], dim=-1).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, kept_groups, 1.0).bool()
        expert_mask = group_mask.repeat_interleave(c["num_experts"] // groups, dim=1)
        chosen = biased.masked_fill(~expert_mask, float("-inf")).topk(
            c["num_experts_per_tok"], dim=-1).indices
        weights = scores.gather(1, chosen)
        if c["num_experts_per_tok"] > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * c["routed_scaling_factor"]
        out = torch.zeros_like(x)
        for e in range(c["num_experts"]):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if len(rows):
                y = self._swiglu(p + f"experts.{e}.", x[rows])
                out.index_add_(0, rows, y * weights[rows, slot, None].to(x.dtype))
        if c.get("num_shared_experts"):
            out = out + self._swiglu(p + "shared_experts.", x)
        return out

    def forward(self, tokens: torch.Tensor, *, block_length: int | None = None
                ) -> torch.Tensor:
        """Logits [L, V] of one sequence; `block_length`: block-causal attention (a row sees
        its own block and the blocks before it), else bidirectional."""
        n = len(tokens)
        positions = torch.arange(n)
        allowed = torch.ones(n, n, dtype=torch.bool)
        if block_length is not None:
            block = positions // block_length
            allowed = block[None, :] <= block[:, None]
        x = self.w["model.word_embeddings.weight"][tokens]
        for i in range(self.config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = x + self._attention(i, _rms_norm(x, self.w[p + "input_layernorm.weight"],
                                                  self.eps), positions, allowed)
            h = _rms_norm(x, self.w[p + "post_attention_layernorm.weight"], self.eps)
            dense = i < self.config.get("first_k_dense_replace", 0)
            x = x + (self._swiglu(p + "mlp.", h) if dense else self._moe(i, h))
        x = _rms_norm(x, self.w["model.norm.weight"], self.eps)
        return x @ self.w["lm_head.weight"].T
