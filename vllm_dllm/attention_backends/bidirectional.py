"""Bidirectional attention over vLLM's paged KV cache for a chosen set of query rows.

A forward pass computes some positions of each request (all of them, a block,
a few tokens): their fresh K/V are written into the request's pages first, then
each query row attends, with no causal mask, to every position the request has
in the cache, fresh or stale. Positions not recomputed keep the K/V an earlier
pass left there, which is what approximate KV caching and token skipping reuse.

Per-layer KV cache view: [num_blocks, num_kv_heads, block_size, 2 * head_size],
K in the first half of the last axis and V in the second.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from vllm_dllm.attention_backends.paged_attention import paged_attention, write_kv

BACKEND_NAME = "DLLM_BIDIRECTIONAL"


@dataclass
class BidirectionalMetadata:
    """Query rows of one forward pass, grouped by request.

    Rows of request b are `query_start_loc[b]:query_start_loc[b+1]`; the request
    has `seq_lens[b]` positions in the pages listed by `block_table[b]`;
    `slot_mapping[t]` is the cache slot that row t's K/V are written to.
    """

    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int


class BidirectionalAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["BidirectionalAttentionImpl"]:
        return BidirectionalAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["BidirectionalMetadataBuilder"]:
        return BidirectionalMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class BidirectionalMetadataBuilder(AttentionMetadataBuilder[BidirectionalMetadata]):
    """Used by vLLM's own dummy and profiling passes; the dLLM runner builds
    `BidirectionalMetadata` itself because its query rows are not a suffix."""

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> BidirectionalMetadata:
        m = common_attn_metadata
        return BidirectionalMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
        )


class BidirectionalAttentionImpl(AttentionImpl[BidirectionalMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
    ) -> None:
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise NotImplementedError("bidirectional dLLM attention has no alibi, "
                                      "sliding window or soft cap")
        if kv_cache_dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise NotImplementedError(f"KV cache dtype {kv_cache_dtype} is not supported")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: BidirectionalMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_metadata is None:  # profiling pass without pages
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        write_kv(kv_cache, attn_metadata.slot_mapping[:n], key[:n].to(kv_cache.dtype),
                 value[:n].to(kv_cache.dtype))
        return paged_attention(query[:n], kv_cache, attn_metadata.query_start_loc,
                               attn_metadata.seq_lens, attn_metadata.block_table, self.scale,
                               attn_metadata.max_query_len, attn_metadata.max_seq_len, output)
