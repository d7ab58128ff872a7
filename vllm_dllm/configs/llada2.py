"""LLaDA2.x's `config.json` as a transformers config, so no remote code is needed.

inclusionAI/LLaDA2.0-mini and -flash name `configuration_llada2_moe.LLaDA2MoeConfig` in
`auto_map` (`model_type: "llada2_moe"`): Ling 2.0's BailingMoeV2 fields (GQA attention with
per-head q/k RMSNorm and partial RoPE, a mixture of experts with a shared expert, sigmoid
grouped routing with an expert bias). The defaults are that configuration file's, but for
the vocabulary and the pad id, which are LLaDA2's tokenizer's like the mask and end ids; the
fields vLLM's `bailing_moe.py` reads and the original file does not declare (`use_rmsnorm`,
`rope_parameters`) are derived here. The config carries no mask or end id: LLaDA2's
`generate` (`modeling_llada2_moe.py`) takes them as arguments, and their defaults there
are these.
"""

from transformers import PretrainedConfig

# `modeling_llada2_moe.LLaDA2MoeModelLM.generate`'s defaults: the block it was trained
# to decode with and the mask and end-of-text ids of LLaDA2's tokenizer.
BLOCK_LENGTH = 32
MASK_TOKEN_ID = 156895
EOS_TOKEN_ID = 156892


class LLaDA2MoeConfig(PretrainedConfig):
    model_type = "llada2_moe"

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 1024,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 0,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_qk_norm: bool = True,
        use_bias: bool = True,
        rms_norm_eps: float = 1e-05,
        norm_head: bool = False,
        tie_word_embeddings: bool = False,
        embedding_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        output_dropout: float = 0.1,
        max_position_embeddings: int = 16384,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        pad_token_id: int = EOS_TOKEN_ID,
        num_experts: int = 16,
        num_shared_experts: int = 0,
        num_experts_per_tok: int = 2,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        moe_intermediate_size: int | None = None,
        first_k_dense_replace: int = 0,
        head_dim: int | None = None,
        partial_rotary_factor: float = 0.5,
        rotary_dim: int | None = None,
        score_function: str = "sigmoid",
        moe_router_enable_expert_bias: bool = True,
        router_dtype: str | None = "fp32",
        norm_topk_prob: bool = True,
        mask_token_id: int = MASK_TOKEN_ID,
        eos_token_id: int = EOS_TOKEN_ID,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_qk_norm = use_qk_norm
        # The original's q/k norms are RMSNorms whatever this says; vLLM reads it.
        self.use_rmsnorm = True
        kwargs.pop("use_rmsnorm", None)
        self.use_bias = use_bias
        self.rms_norm_eps = rms_norm_eps
        self.norm_head = norm_head
        self.embedding_dropout = embedding_dropout
        self.attention_dropout = attention_dropout
        self.output_dropout = output_dropout
        self.max_position_embeddings = max_position_embeddings
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.partial_rotary_factor = partial_rotary_factor
        self.rotary_dim = rotary_dim or int(self.head_dim * partial_rotary_factor)
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.rope_parameters = {**(rope_scaling or {"rope_type": "default"}),
                                "rope_theta": rope_theta}
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.score_function = score_function
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.router_dtype = router_dtype
        self.norm_topk_prob = norm_topk_prob
        self.mask_token_id = mask_token_id
        # Attention is block-causal, which no transformers flag describes; the registry
        # declares it. The sliding-window fields are off in every release.
        self.is_causal = False
        self.sliding_window = None
        kwargs.pop("use_sliding_window", None)
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def dllm_block_length(self) -> int:
        """The block LLaDA2 decodes by (`registry.DllmArchitecture.block_causal`)."""
        return BLOCK_LENGTH
