"""LLaDA2.x (inclusionAI/LLaDA2.0-mini, -flash; tech report in github inclusionAI/LLaDA2.X) on
vLLM's own Ling 2.0 layers.

LLaDA2's network is Ling 2.0's BailingMoeV2 (`modeling_llada2_moe.py`): GQA attention
over one fused `query_key_value` projection, per-head q/k RMSNorm, RoPE on the first half
of each head, a dense SwiGLU in the first `first_k_dense_replace` layers and a mixture of
experts after (sigmoid scores, an expert bias for the choice, grouped top-k, renormalised
and scaled weights, one shared expert). vLLM implements exactly that in `bailing_moe.py`
(`BailingMoeForCausalLM`, on `FusedMoE`), and its weight loader reads the original names,
so this class is that model with two changes: attention goes through the plugin's backend
(query segments laid out by the engine make it block-causal, blocks of
`LLaDA2MoeConfig.dllm_block_length` from position 0), and the forward runs the plugin's
layer loop with its row controller. Logits row p predicts position p (LLaDA2's `generate`
reads a masked position's own row).
"""

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.bailing_moe import BailingAttention, BailingMoeForCausalLM
from vllm.sequence import IntermediateTensors

from vllm_dllm.attention_backends.bidirectional import BidirectionalAttentionBackend
from vllm_dllm.model_executor.decoder import LayerHook


def use_plugin_backend(attention: BailingAttention, vllm_config: VllmConfig) -> None:
    """Rebuild the `Attention` vLLM's layer made (on the platform's causal backend) on the
    plugin's backend, under the same layer name."""
    old = attention.attn
    del vllm_config.compilation_config.static_forward_context[old.layer_name]
    attention.attn = Attention(
        old.num_heads, old.head_size, attention.scale, num_kv_heads=old.num_kv_heads,
        cache_config=vllm_config.cache_config, prefix=old.layer_name,
        attn_backend=BidirectionalAttentionBackend)


class LLaDA2MoeModelLM(BailingMoeForCausalLM):
    dllm_logits_offset = 0

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        for layer in self.model.layers:
            use_plugin_backend(layer.attention, vllm_config)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        rows: LayerHook | None = None,
    ) -> torch.Tensor:
        # `decoder.run_layers`' loop for vLLM's layers, which take and return the residual
        # apart. Token skipping is refused for block-causal models, so no layer is sparse.
        x = self.model.embed_input_ids(input_ids)
        for i, layer in enumerate(self.model.layers):
            if rows is not None:
                if rows.before(i) is not None:
                    raise NotImplementedError("LLaDA2 layers have no sparse (DyLLM) path")
                positions = rows.positions
            hidden, residual = layer(x, positions, None)
            x = hidden + residual
            if rows is not None:
                x = rows.after(i, x)
        return self.model.norm(x)
