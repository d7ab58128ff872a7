"""LLaDA's `config.json` as a transformers config, so no remote code is needed.

The original checkpoint uses OLMo field names (`d_model`, `n_heads`, ...); this
class keeps them and exposes the standard names vLLM reads.
"""

from transformers import PretrainedConfig

# `<|eot_id|>` of LLaDA-8B-Instruct: its config.json does not name it, yet the
# Instruct model ends every answer with it (models.md §1.7).
LLADA_EOT_TOKEN_ID = 126348


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_hidden_size: int | None = 12288,
        mlp_ratio: int = 4,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        max_sequence_length: int = 4096,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 500000.0,
        weight_tying: bool = False,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        mask_token_id: int = 126336,
        eos_token_id: int = 126081,
        pad_token_id: int = 126081,
        eot_token_id: int = LLADA_EOT_TOKEN_ID,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_hidden_size or mlp_ratio * d_model
        self.embedding_size = embedding_size or vocab_size
        self.max_sequence_length = max_sequence_length
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.weight_tying = weight_tying
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.mask_token_id = mask_token_id
        self.eot_token_id = eot_token_id

        self.hidden_size = d_model
        self.num_attention_heads = n_heads
        self.num_key_value_heads = self.n_kv_heads
        self.num_hidden_layers = n_layers
        self.head_dim = d_model // n_heads
        self.intermediate_size = self.mlp_hidden_size
        self.max_position_embeddings = max_sequence_length
        self.is_causal = False
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(
            vocab_size=self.embedding_size,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=weight_tying,
            **kwargs,
        )
        # `vocab_size` is the padded embedding size: logits rows, not tokenizer size.
        self.vocab_size = self.embedding_size
