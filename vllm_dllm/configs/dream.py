"""Dream's `config.json` and tokenizer without remote code.

Dream-org/Dream-v0-*-7B name `configuration_dream.DreamConfig` (Qwen2 field
names, `model_type: "Dream"`) and `tokenization_dream.DreamTokenizer` (a copy of
Qwen2's byte-level BPE tokenizer) in `auto_map`; registering classes of those
names lets transformers load the original folder with `trust_remote_code` off.
"""

from transformers import PretrainedConfig
from transformers.models.qwen2 import Qwen2Tokenizer

# `<|im_end|>`: config.json does not name it, yet the Instruct model ends every
# turn with it and then pads with `<|endoftext|>` (models.md §2.7).
DREAM_EOT_TOKEN_ID = 151645


class DreamConfig(PretrainedConfig):
    model_type = "Dream"

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int | None = 4,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1000000.0,
        rope_scaling: dict | None = None,
        attention_dropout: float = 0.0,
        tie_word_embeddings: bool = False,
        mask_token_id: int = 151666,
        eos_token_id: int = 151643,
        pad_token_id: int = 151643,
        bos_token_id: int = 151643,
        eot_token_id: int = DREAM_EOT_TOKEN_ID,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        self.eot_token_id = eot_token_id
        # Dream's attention is bidirectional whatever the checkpoint's `use_sliding_window`.
        self.is_causal = False
        self.sliding_window = None
        kwargs.pop("use_sliding_window", None)
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


class DreamTokenizer(Qwen2Tokenizer):
    """Dream's tokenizer: Qwen2's, built from the folder's vocab.json and merges.txt."""
