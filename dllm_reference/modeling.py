"""Plain PyTorch LLaDA (arXiv:2502.09992): the Llama-style blocks of LLaDA-8B-Instruct's
`modeling_llada.py` (RMSNorm, RoPE, SwiGLU), with fully bidirectional attention.

It reads the original checkpoint format (config.json + safetensors with
`model.transformer.*` names) and is the oracle the plugin is checked against.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    # NeoX halves, computed in fp32 as `rope_full_precision` asks.
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x32 = x.float()
    x1, x2 = x32[..., : dim // 2], x32[..., dim // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class ReferenceLLaDA(torch.nn.Module):
    """Full-sequence, fully bidirectional LLaDA forward.

    tokens [L] -> logits [L, V], or a batch [B, L] -> [B, L, V]. Batched inputs may carry a
    key-padding `attention_mask` [B, L] (1 = real token) for right-padded rows: with the
    padding at the end and masked as keys, the real rows see exactly what an unpadded
    forward sees (positions stay 0..n-1). `trainable=True` makes the weights
    learnable, which is how benchmarks/train.py trains small checkpoints with it.
    """

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor], trainable: bool = False):
        super().__init__()
        self.config = config
        self.n_layers = config["n_layers"]
        self.n_heads = config["n_heads"]
        self.n_kv_heads = config.get("n_kv_heads") or config["n_heads"]
        self.head_dim = config["d_model"] // config["n_heads"]
        self.eps = config.get("rms_norm_eps", 1e-5)
        self.theta = config.get("rope_theta", 10000.0)
        # ParameterDict keys may not contain dots; checkpoint names have no "__" of their own.
        self.weights = torch.nn.ParameterDict(
            {k.replace(".", "__"): torch.nn.Parameter(v, requires_grad=trainable)
             for k, v in state_dict.items()}
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        trainable: bool = False) -> "ReferenceLLaDA":
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update({k: v.to(dtype) for k, v in load_file(str(file)).items()})
        return cls(config, state, trainable=trainable)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under their checkpoint names (`model.transformer.*`)."""
        return {k.replace("__", "."): v.detach() for k, v in self.weights.items()}

    def w(self, name: str) -> torch.Tensor:
        return self.weights[f"model__transformer__{name}".replace(".", "__")]

    # The layer's parts, shared by the forwards here and the skipping forwards
    # (`skipping.py`), which call them one by one on the rows they keep. Leading
    # dims of `x` [..., n, d] are kept; `positions` [n] are the rows' positions.

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.w("wte.weight"))

    def project(self, i: int, x: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's post-RoPE q [..., n_heads, n, hd], k and v [..., n_kv_heads, n, hd]."""
        p = f"blocks.{i}."
        h = _rms_norm(x, self.w(p + "attn_norm.weight"), self.eps)

        def heads(name: str, n: int) -> torch.Tensor:
            proj = h @ self.w(p + name).T
            return proj.view(*proj.shape[:-1], n, self.head_dim).transpose(-3, -2)

        q = _rope(heads("q_proj.weight", self.n_heads), positions, self.theta)
        k = _rope(heads("k_proj.weight", self.n_kv_heads), positions, self.theta)
        return q, k, heads("v_proj.weight", self.n_kv_heads)

    def attention_output(self, i: int, context: torch.Tensor) -> torch.Tensor:
        """Layer i's output projection of the attention context [..., n, n_heads * hd]."""
        return context @ self.w(f"blocks.{i}.attn_out.weight").T

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's feed-forward branch (its norm included), added to `x` by the caller."""
        p = f"blocks.{i}."
        h = _rms_norm(x, self.w(p + "ff_norm.weight"), self.eps)
        gate = h @ self.w(p + "ff_proj.weight").T
        up = h @ self.w(p + "up_proj.weight").T
        return (F.silu(gate) * up) @ self.w(p + "ff_out.weight").T

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.w("ln_f.weight"), self.eps) @ self.w("ff_out.weight").T

    def forward(self, tokens: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # Leading dims are kept as given (none for [L]) so the single-sequence path runs
        # the same kernels, bit for bit, as before batching was added.
        lead, length = tokens.shape[:-1], tokens.shape[-1]
        positions = torch.arange(length)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embed(tokens)
        for i in range(self.n_layers):
            q, k, v = self.project(i, x, positions)
            if self.n_kv_heads != self.n_heads:
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
            x = x + self.attention_output(i, a.transpose(-3, -2).reshape(*lead, length, -1))
            x = x + self.ffn(i, x)
        return self.head(x)

    def forward_partial(self, tokens: torch.Tensor, query: torch.Tensor | list[torch.Tensor],
                        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                        ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Recompute only the positions `query` of one sequence [L].

        Every other position's keys and values come from `past` (per layer, post-RoPE,
        [n_kv_heads, L, head_dim]), as Fast-dLLM's approximate caches do; the queried rows
        attend bidirectionally to the whole sequence. Without `past`, `query` must cover
        every position. `query` may also be one ascending position set per layer, each
        inside the one before (token skipping): a row dropped at a layer keeps its cached
        K/V from there on. Returns the logits of the last layer's rows and the layer K/V
        with the computed rows fresh.
        """
        length = tokens.shape[-1]
        per_layer = query if isinstance(query, list) else [query] * self.n_layers
        query = per_layer[0]
        assert past is not None or len(query) == length
        x = self.embed(tokens[query])
        present = []
        for i in range(self.n_layers):
            if per_layer[i] is not query:
                keep = torch.searchsorted(query, per_layer[i])
                assert bool((query[keep] == per_layer[i]).all()), "layer sets must be nested"
                x, query = x[keep], per_layer[i]
            q, k_new, v_new = self.project(i, x, query)
            if past is None:
                k, v = k_new, v_new
            else:
                k, v = past[i][0].clone(), past[i][1].clone()
                k[:, query], v[:, query] = k_new, v_new
            present.append((k, v))
            if self.n_kv_heads != self.n_heads:
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=False)
            x = x + self.attention_output(i, a.transpose(0, 1).reshape(len(query), -1))
            x = x + self.ffn(i, x)
        return self.head(x), present
