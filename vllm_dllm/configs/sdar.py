"""SDAR's `config.json` as a transformers config, so no remote code is needed.

JetLM/SDAR-*-Chat name `configuration_sdar.SDARConfig` in `auto_map`: Qwen3's fields
(`model_type: "sdar"`) plus `block_size`, the block length the model was trained with
(block-causal attention over blocks cut from position 0), and `mask_token_id`. The
training-only fields of the original (`fuse_cross_entropy`, `micro_forward`, `ep_size`,
...) are kept as plain attributes.
"""

from transformers import PretrainedConfig

# SDAR's generate.py and the SDAR-*-Chat model cards decode with blocks of 4; a config
# without `block_size` is read as that.
DEFAULT_BLOCK_SIZE = 4


class SDARConfig(PretrainedConfig):
    model_type = "sdar"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 12288,
        num_hidden_layers: int = 36,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 8,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1000000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        tie_word_embeddings: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
        mask_token_id: int = 151669,
        eos_token_id: int = 151643,
        pad_token_id: int | None = None,
        bos_token_id: int = 151643,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.block_size = block_size or DEFAULT_BLOCK_SIZE
        self.mask_token_id = mask_token_id
        # Attention is block-causal, which no transformers flag describes; the plugin's
        # registry declares it (`DllmArchitecture.block_causal`). The config's sliding-window fields are off in every release.
        self.is_causal = False
        self.sliding_window = None
        kwargs.pop("use_sliding_window", None)
        # The original trains with flex_attention; nothing here runs transformers' model.
        kwargs.pop("attn_implementation", None)
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def dllm_block_length(self) -> int:
        """The block the checkpoint was trained with, what the plugin decodes by
        (`registry.DllmArchitecture.block_causal`)."""
        return self.block_size
