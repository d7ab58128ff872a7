"""Plain PyTorch reference decoder: one bidirectional pre-norm layer (RMSNorm, RoPE, GQA,
optional q/k/v bias, SwiGLU) that serves LLaDA (arXiv:2502.09992; LLaDA-8B-Instruct's
`modeling_llada.py`) and Dream (`dream.ReferenceDream`), each through its checkpoint's
own weight names (`Layout`).

It reads the original checkpoint format (config.json + safetensors) and is the oracle the
plugin is checked against.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float, full_precision: bool
          ) -> torch.Tensor:
    """NeoX halves. `full_precision`: rotate in fp32 (LLaDA's `rope_full_precision`);
    otherwise cos/sin are cast to the activation dtype and it rotates there (Qwen2)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    work = x.float() if full_precision else x
    cos, sin = emb.cos().to(work.dtype), emb.sin().to(work.dtype)
    x1, x2 = work[..., : dim // 2], work[..., dim // 2 :]
    return (work * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


@dataclass(frozen=True)
class Layout:
    """Where an architecture's checkpoint keeps each weight (`{i}`: the layer) and how it
    rotates; q/k/v biases are used where the checkpoint has them. `q_norm`/`k_norm`: a
    per-head RMSNorm on q and k before RoPE (Qwen3's layer, which SDAR uses)."""

    embed: str
    attn_norm: str
    q: str
    k: str
    v: str
    o: str
    ffn_norm: str
    gate: str
    up: str
    down: str
    final_norm: str
    head: str
    rope_full_precision: bool
    q_norm: str | None = None
    k_norm: str | None = None


class ReferenceDecoder(torch.nn.Module):
    """Full-sequence, fully bidirectional pre-norm decoder (RMSNorm, RoPE, GQA, SwiGLU) over
    a checkpoint's own weight names: LLaDA's and Dream's layer, one definition.

    tokens [L] -> logits [L, V], or a batch [B, L] -> [B, L, V]. Batched inputs may carry a
    key-padding `attention_mask` [B, L] (1 = real token) for right-padded rows: with the
    padding at the end and masked as keys, the real rows see exactly what an unpadded
    forward sees (positions stay 0..n-1). `trainable=True` makes the weights learnable.
    """

    layout: Layout

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor], *, n_layers: int,
                 n_heads: int, n_kv_heads: int, head_dim: int, eps: float, theta: float,
                 trainable: bool = False):
        super().__init__()
        self.config = config
        self.n_layers, self.n_heads, self.n_kv_heads = n_layers, n_heads, n_kv_heads
        self.head_dim, self.eps, self.theta = head_dim, eps, theta
        # ParameterDict keys may not contain dots; checkpoint names have no "__" of their own.
        self.weights = torch.nn.ParameterDict(
            {k.replace(".", "__"): torch.nn.Parameter(v, requires_grad=trainable)
             for k, v in state_dict.items()}
        )

    @staticmethod
    def load(path: str | Path, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
        """config.json and the safetensors weights of a checkpoint folder."""
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update({k: v.to(dtype) for k, v in load_file(str(file)).items()})
        return config, state

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under their checkpoint names."""
        return {k.replace("__", "."): v.detach() for k, v in self.weights.items()}

    def w(self, name: str, layer: int | None = None) -> torch.Tensor:
        return self.weights[name.format(i=layer).replace(".", "__")]

    def _linear(self, h: torch.Tensor, name: str, layer: int) -> torch.Tensor:
        out = h @ self.w(name + ".weight", layer).T
        bias = (name + ".bias").format(i=layer).replace(".", "__")
        return out + self.weights[bias] if bias in self.weights else out

    # The layer's parts, shared by the forwards here and the skipping forwards
    # (`skipping.py`), which call them one by one on the rows they keep. Leading
    # dims of `x` [..., n, d] are kept; `positions` [n] are the rows' positions.

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.w(self.layout.embed))

    def project(self, i: int, x: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's post-RoPE q [..., n_heads, n, hd], k and v [..., n_kv_heads, n, hd]."""
        lay = self.layout
        h = _rms_norm(x, self.w(lay.attn_norm, i), self.eps)

        def heads(name: str, n: int, norm: str | None = None) -> torch.Tensor:
            proj = self._linear(h, name, i)
            proj = proj.view(*proj.shape[:-1], n, self.head_dim)
            if norm is not None:
                proj = _rms_norm(proj, self.w(norm, i), self.eps)
            return proj.transpose(-3, -2)

        q, k = (_rope(heads(name, n, norm), positions, self.theta, lay.rope_full_precision)
                for name, n, norm in ((lay.q, self.n_heads, lay.q_norm),
                                      (lay.k, self.n_kv_heads, lay.k_norm)))
        return q, k, heads(lay.v, self.n_kv_heads)

    def attention_output(self, i: int, context: torch.Tensor) -> torch.Tensor:
        """Layer i's output projection of the attention context [..., n, n_heads * hd]."""
        return context @ self.w(self.layout.o, i).T

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's feed-forward branch (its norm included), added to `x` by the caller."""
        lay = self.layout
        h = _rms_norm(x, self.w(lay.ffn_norm, i), self.eps)
        gate, up = h @ self.w(lay.gate, i).T, h @ self.w(lay.up, i).T
        return (F.silu(gate) * up) @ self.w(lay.down, i).T

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.w(self.layout.final_norm), self.eps) @ self.w(self.layout.head).T

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *, block_length: int | None = None) -> torch.Tensor:
        """`block_length`: block-causal attention (block diffusion, arXiv:2503.09573 §3):
        a row sees every position of its own block and of the blocks before it, blocks
        cut from position 0."""
        # Leading dims are kept as given (none for [L]) so the single-sequence path runs
        # the same kernels, bit for bit, as before batching was added.
        positions = torch.arange(tokens.shape[-1])
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        if block_length is not None:
            block = positions // block_length
            causal = block[None, :] <= block[:, None]
            key_mask = causal if key_mask is None else key_mask & causal
        return self.forward_masked(tokens, positions, key_mask)

    def forward_masked(self, tokens: torch.Tensor, positions: torch.Tensor,
                       key_mask: torch.Tensor | None) -> torch.Tensor:
        """The full forward of rows at `positions` [L] (RoPE), row r attending to key c
        where `key_mask` (broadcast to [..., 1, L, L]) is true; None: everywhere. Block
        diffusion training runs a noisy and a clean copy of a sequence in one pass this way
        (benchmarks/train.py)."""
        lead, length = tokens.shape[:-1], tokens.shape[-1]
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


class ReferenceLLaDA(ReferenceDecoder):
    """LLaDA's checkpoint (`model.transformer.*` names); benchmarks/train.py trains small
    checkpoints with it (`trainable=True`)."""

    layout = Layout(
        embed="model.transformer.wte.weight",
        attn_norm="model.transformer.blocks.{i}.attn_norm.weight",
        q="model.transformer.blocks.{i}.q_proj", k="model.transformer.blocks.{i}.k_proj",
        v="model.transformer.blocks.{i}.v_proj",
        o="model.transformer.blocks.{i}.attn_out.weight",
        ffn_norm="model.transformer.blocks.{i}.ff_norm.weight",
        gate="model.transformer.blocks.{i}.ff_proj.weight",
        up="model.transformer.blocks.{i}.up_proj.weight",
        down="model.transformer.blocks.{i}.ff_out.weight",
        final_norm="model.transformer.ln_f.weight", head="model.transformer.ff_out.weight",
        rope_full_precision=True)

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor], trainable: bool = False):
        super().__init__(config, state_dict, n_layers=config["n_layers"],
                         n_heads=config["n_heads"],
                         n_kv_heads=config.get("n_kv_heads") or config["n_heads"],
                         head_dim=config["d_model"] // config["n_heads"],
                         eps=config.get("rms_norm_eps", 1e-5),
                         theta=config.get("rope_theta", 10000.0), trainable=trainable)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        trainable: bool = False) -> "ReferenceLLaDA":
        return cls(*cls.load(path, dtype), trainable=trainable)
