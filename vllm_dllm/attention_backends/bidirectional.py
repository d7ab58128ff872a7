"""Bidirectional attention over vLLM's paged KV cache for a chosen set of query rows.

A forward pass computes some positions of each request (all of them, a block,
a few tokens): their fresh K/V are written into the request's pages first, then
each query row attends, with no causal mask, to every position the request has
in the cache, fresh or stale. Positions not recomputed keep the K/V an earlier
pass left there, which is what approximate KV caching and token skipping reuse.
The metadata's "requests" are segments (a block-causal request has one per block
it computes, each with its own key length), which is what every kernel takes.

Per-layer KV cache view: [num_blocks, num_kv_heads, block_size, 2 * head_size],
K in the first half of the last axis and V in the second; the physical order of
its axes is the layout the backend declares. `select_kernels` decides, once per
layer shape, which kernel serves each kind of pass (logged at start-up):
- CUDA: vLLM's FlashAttention (`reshape_and_cache_flash`, one non-causal
  `flash_attn_varlen_func` call over the pages, as vLLM's `FlashAttentionImpl`
  calls it) for exact passes when it is built and the dtype, head size and pages
  suit it; layout `LBNHC` (pages, slots, heads), the one vLLM gives it;
- x86 CPUs: vLLM's own CPU attention ops (`cpu_attn_reshape_and_cache`,
  `cpu_attention_with_kv_cache`, non-causal) when the shapes suit them: head size
  a multiple of 16 in vLLM's list, pages a multiple of 16 (32 for the `vec` ISA),
  blocks with [heads, slots, 2D] contiguous (layout `LBHNC`). Each page of a head
  then holds K transposed ([D, block]) then V ([block, D]);
- otherwise `paged_attention.py` (Triton on CUDA, one padded SDPA call elsewhere),
  which reads the view through its strides, and on every device but the CPU
  kernel's DyLLM's approximate attention (`approximate_attention`), which
  FlashAttention cannot express (it has no sparse value product).
"""

import functools
from dataclasses import dataclass, replace
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
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.platforms import CpuArchEnum, current_platform
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_dllm.attention_backends.paged_attention import (
    DeltaRows,
    approximate_attention,
    gather_pages,
    paged_attention,
    read_values,
    triton_serves,
    write_kv,
)

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger: its handler and level

BACKEND_NAME = "DLLM_BIDIRECTIONAL"

# The kernels a pass can run on (the names the start-up log gives).
FLASH = "vLLM FlashAttention (flash_attn_varlen_func)"
CPU_KERNEL = "vLLM cpu_attention_with_kv_cache"
CPU_KERNEL_APPROXIMATE = "vLLM cpu_attention_with_kv_cache, twice (scratch ΔV cache)"
TRITON = "paged_attention_triton"
TORCH = "paged_attention_torch (padded SDPA)"
TORCH_APPROXIMATE = "approximate_attention (gathered pages)"


@dataclass(frozen=True)
class Kernels:
    """The kernel of each kind of pass of a layer: `exact` (every query row attends to
    all of its segment's keys) and `approximate` (DyLLM's `DeltaRows` layers), with
    the FlashAttention version or CPU ISA they run with."""

    exact: str
    approximate: str
    flash_version: int | None = None
    cpu_isa: str | None = None


def select_kernels(device_type: str, dtype: torch.dtype, head_size: int, block_size: int,
                   flash_version: int | None, cpu_isa: str | None) -> Kernels:
    """Which kernel serves which pass, from the device, the KV cache's dtype, the head
    and page sizes, the FlashAttention version vLLM would run here (None: not built
    or not supported by this GPU) and the CPU ISA `_cpu_kernel_isa` found (None: the
    CPU kernel does not fit). FlashAttention's own limits are asked from vLLM's
    `FlashAttentionBackend` (fp16/bf16 only, head size, pages a multiple of 16)."""
    flash = (device_type == "cuda" and flash_version is not None
             and FlashAttentionBackend.supports_dtype(dtype)
             and FlashAttentionBackend.supports_head_size(head_size)
             and FlashAttentionBackend.supports_block_size(block_size))
    if flash:
        exact = FLASH
    elif cpu_isa is not None:
        exact = CPU_KERNEL
    elif triton_serves(device_type, head_size):
        exact = TRITON
    else:
        exact = TORCH
    approximate = CPU_KERNEL_APPROXIMATE if cpu_isa is not None else TORCH_APPROXIMATE
    return Kernels(exact, approximate, flash_version if flash else None, cpu_isa)


def _flash_version(head_size: int) -> int | None:
    """The FlashAttention version vLLM runs on this GPU for `head_size`, None where it
    has none (a CPU, a build without it, compute capability below 8.0)."""
    if not current_platform.is_cuda():
        return None
    from vllm.v1.attention.backends import fa_utils

    if not fa_utils.is_flash_attn_varlen_func_available():
        return None
    return fa_utils.get_flash_attn_version(head_size=head_size)


@functools.cache
def _log_kernels(num_kv_heads: int, head_size: int) -> None:
    """Logs, once per process and head shape, which kernel will serve which pass: what
    `_layer_kernels` picks for the KV cache vLLM allocates under the current config
    (a layer built outside a vLLM config logs nothing)."""
    config = get_current_vllm_config_or_none()
    if config is None or config.model_config is None:
        return
    dtype = config.model_config.dtype
    if config.cache_config.cache_dtype not in ("auto", None):
        dtype = getattr(torch, config.cache_config.cache_dtype)
    block_size = config.cache_config.block_size or 16
    # A layer view with the declared layout's strides: heads outside slots on CPUs
    # (LBHNC), slots outside heads elsewhere (LBNHC).
    if current_platform.is_cpu():
        view = torch.empty(1, num_kv_heads, block_size, 2 * head_size, device="meta")
    else:
        view = torch.empty(1, block_size, num_kv_heads, 2 * head_size,
                           device="meta").transpose(1, 2)
    kernels = _layer_kernels(current_platform.device_type, dtype, head_size,
                             tuple(view.shape), tuple(view.stride()))
    logger.info("dLLM attention (%s, %s, head size %d, pages of %d): exact passes on %s%s; "
                "DyLLM's approximate attention on %s", current_platform.device_type, dtype,
                head_size, block_size, kernels.exact,
                f" (FA{kernels.flash_version})" if kernels.flash_version else
                f" (ISA {kernels.cpu_isa})" if kernels.cpu_isa else "", kernels.approximate)


@functools.cache
def _layer_kernels(device_type: str, dtype: torch.dtype, head_size: int,
                   shape: tuple[int, ...], stride: tuple[int, ...]) -> Kernels:
    """`select_kernels` for a layer's KV cache view (same answer for every layer of a
    model, so computed once)."""
    isa = _cpu_kernel_isa(device_type, head_size, dtype, shape, stride)
    return select_kernels(device_type, dtype, head_size, shape[2],
                          _flash_version(head_size) if device_type == "cuda" else None, isa)


@dataclass
class BidirectionalMetadata:
    """Query rows of one forward pass, grouped by request.

    Rows of request b are `query_start_loc[b]:query_start_loc[b+1]`; the request
    has `seq_lens[b]` positions in the pages listed by `block_table[b]`;
    `slot_mapping[t]` is the cache slot that K/V row t is written to (negative:
    not written). A layer may get fewer K/V rows than query rows (a sparse layer
    refreshes the K/V of some rows only); `slot_mapping` then lists theirs, and
    `delta`, where set, makes the layer's attention DyLLM's approximation. Built
    once per row set (`rows_metadata`, or vLLM's builder for its own dummy passes)
    and only read afterwards.
    """

    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    delta: DeltaRows | None = None


def row_offsets(counts: torch.Tensor | list[int]) -> torch.Tensor:
    """[B + 1] host offsets of a pass laid out request after request, `counts[b]` rows
    each: request b's rows are `offsets[b]:offsets[b + 1]`."""
    counts = torch.as_tensor(counts, dtype=torch.long)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def rows_metadata(counts: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                  slot_mapping: torch.Tensor, device: torch.device) -> BidirectionalMetadata:
    """The metadata of a pass whose request b has `counts[b]` query rows; `counts` and
    `seq_lens` [B] are host tensors, `block_table` [B, pages] and `slot_mapping` [N]
    are on `device`."""
    starts = row_offsets(counts)
    return BidirectionalMetadata(
        num_actual_tokens=int(starts[-1]),
        query_start_loc=starts.to(device, torch.int32, non_blocking=True),
        seq_lens=seq_lens.to(device, torch.int32, non_blocking=True),
        block_table=block_table,
        slot_mapping=slot_mapping,
        max_query_len=int(counts.max()) if len(counts) else 0,
        max_seq_len=int(seq_lens.max()) if len(seq_lens) else 0,
    )


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
        # FlashAttention's paged kernels read pages of a multiple of 16 slots.
        return [MultipleOf(16)] if current_platform.is_cuda() else [MultipleOf(1)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...] | None:
        if current_platform.is_cpu():
            # vLLM's CPU kernel views a page as [heads, 2 * slots, D]: heads outside slots.
            return (KVCacheLayout.LBHNC,)
        if current_platform.is_cuda():
            # FlashAttention's: vLLM gives it the default, slots outside heads, and its
            # `FlashAttentionImpl` reads K and V as [pages, slots, heads, D] views.
            return (KVCacheLayout.LBNHC,)
        return None

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class BidirectionalMetadataBuilder(AttentionMetadataBuilder[BidirectionalMetadata]):
    """vLLM's own dummy and profiling passes; the dLLM runner's passes, whose query
    rows are not a suffix of the sequence, use `rows_metadata`."""

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
        _log_kernels(self.num_kv_heads, head_size)

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
        m = attn_metadata
        n = m.num_actual_tokens
        nk = len(m.slot_mapping)
        kernels = _layer_kernels(kv_cache.device.type, kv_cache.dtype, self.head_size,
                                 tuple(kv_cache.shape), tuple(kv_cache.stride()))
        query, key, value = query[:n], key[:nk].to(kv_cache.dtype), value[:nk].to(kv_cache.dtype)
        isa = kernels.cpu_isa
        if m.delta is not None:
            if isa is not None:
                return self._cpu_kernel_approximate(isa, query, key, value, kv_cache, m, output)
            old = read_values(kv_cache, m.slot_mapping)
            write_kv(kv_cache, m.slot_mapping, key, value)
            k, v = gather_pages(kv_cache, m)
            return approximate_attention(query, k, v, value - old, m, m.delta, self.scale,
                                         output)
        if kernels.exact == FLASH:
            return self._flash_attention(layer, kernels.flash_version, query, key, value,
                                         kv_cache, m, output)
        if isa is not None:
            key_cache, value_cache = _cpu_kernel_halves(kv_cache)
            ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, m.slot_mapping, isa)
            return self._cpu_kernel_attention(isa, query, key_cache, value_cache, m, output)
        write_kv(kv_cache, m.slot_mapping, key, value)
        return paged_attention(query, kv_cache, m, self.scale, output)

    def _flash_attention(self, layer: AttentionLayer, version: int, query: torch.Tensor,
                         key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                         m: BidirectionalMetadata, output: torch.Tensor) -> torch.Tensor:
        """vLLM's FlashAttention, called as its `FlashAttentionImpl` calls it: K/V in
        with `reshape_and_cache_flash` (negative slots are skipped by the op), then one
        varlen call with one sequence per segment, `seqused_k` its key length and
        `causal=False`, the pages read in place through the block table."""
        from vllm.v1.attention.backends.fa_utils import (
            flash_attn_varlen_func,
            reshape_and_cache_flash,
        )

        n = query.shape[0]
        # [pages, heads, slots, 2D] -> K and V as [pages, slots, heads, D] views.
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        reshape_and_cache_flash(key, value, key_cache, value_cache, m.slot_mapping,
                                self.kv_cache_dtype, layer._k_scale, layer._v_scale)
        if n == 0:
            return output
        flash_attn_varlen_func(
            q=query, k=key_cache, v=value_cache,
            out=output[:n].view(n, self.num_heads, self.head_size),
            cu_seqlens_q=m.query_start_loc, max_seqlen_q=m.max_query_len,
            seqused_k=m.seq_lens, max_seqlen_k=m.max_seq_len, softmax_scale=self.scale,
            causal=False, block_table=m.block_table, fa_version=version)
        return output

    def _cpu_kernel_approximate(self, isa: str, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, kv_cache: torch.Tensor,
                                m: BidirectionalMetadata, output: torch.Tensor) -> torch.Tensor:
        """`DeltaRows`' attention on vLLM's CPU kernel, the pages read in place: one call
        for the exact rows, and one for every row against a scratch value cache that
        holds the refreshed rows' change of V and zeros elsewhere, whose output is then
        exactly softmax(q Kᵀ) · ΔV. The kernel has no sparse value product, so this
        costs about one exact call over all rows; `approximate_attention` is the
        definition it is tested against."""
        delta, n = m.delta, query.shape[0]
        key_cache, value_cache = _cpu_kernel_halves(kv_cache)
        slots = m.slot_mapping.clamp(min=0)  # negative: the null page, never read
        blocks, offsets = slots // key_cache.shape[2], slots % key_cache.shape[2]
        change = value - value_cache[blocks, :, offsets]
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, m.slot_mapping, isa)
        exact_rows = delta.exact.nonzero().squeeze(1)
        exact_out = output.new_empty(len(exact_rows), *output.shape[1:])
        if len(exact_rows):
            exact = replace(m, num_actual_tokens=len(exact_rows), max_query_len=delta.max_exact,
                            query_start_loc=torch.searchsorted(exact_rows, m.query_start_loc.long()))
            self._cpu_kernel_attention(isa, query[exact_rows], key_cache, value_cache, exact,
                                       exact_out)
        scratch = _zero_values(tuple(kv_cache.shape), kv_cache.dtype, kv_cache.device)
        scratch[blocks, :, offsets] = change
        self._cpu_kernel_attention(isa, query, key_cache, scratch, m, output)
        scratch[blocks, :, offsets] = 0
        output[:n] += delta.context.view(output[:n].shape).to(output.dtype)
        output[exact_rows] = exact_out
        return output

    def _cpu_kernel_attention(self, isa: str, query: torch.Tensor, key_cache: torch.Tensor,
                              value_cache: torch.Tensor, m: BidirectionalMetadata,
                              output: torch.Tensor) -> torch.Tensor:
        """vLLM's CPU kernel: one non-causal attention call over the pages."""
        n = query.shape[0]
        query_start_loc = m.query_start_loc.to(torch.int32)
        seq_lens = m.seq_lens.to(torch.int32)
        scheduler = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0], num_heads=self.num_heads, num_kv_heads=key_cache.shape[1],
            head_dim=self.head_size, seq_lens=seq_lens, dtype=query.dtype,
            query_start_loc=query_start_loc, causal=False, sliding_window_size=-1, isa=isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache,
            output=output[:n].view(n, self.num_heads, self.head_size),
            query_start_loc=query_start_loc, seq_lens=seq_lens, scale=self.scale, causal=False,
            alibi_slopes=None, sliding_window=-1, block_table=m.block_table.to(torch.int32),
            softcap=0.0, scheduler_metadata=scheduler, s_aux=None)
        return output


def _cpu_kernel_halves(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V caches vLLM's CPU ops take: a page of a head is [2 * block, D], K's
    half holding [D, block] (transposed), V's [block, D]."""
    num_blocks, num_kv_heads, block_size, width = kv_cache.shape
    view = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, width // 2)
    return view[:, :, :block_size], view[:, :, block_size:]


@functools.cache
def _zero_values(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scratch value cache with the strides of a layer's V half (the kernel reads both
    halves alike), one per page shape and shared by every layer; zero between uses."""
    return _cpu_kernel_halves(torch.zeros(shape, dtype=dtype, device=device))[1]


@functools.cache
def _cpu_kernel_isa(device_type: str, head_size: int, dtype: torch.dtype,
                    shape: tuple[int, ...], stride: tuple[int, ...]) -> str | None:
    """The ISA to run vLLM's CPU attention kernel with, or None to use `paged_attention`.

    Only the portable x86 ISAs (`vec`, `vec16`) are used: `amx`, which vLLM picks for
    bf16, stops with SIGILL on machines that report AMX without enabling it.
    """
    if device_type != "cpu" or current_platform.get_cpu_architecture() != CpuArchEnum.X86:
        return None
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    if not hasattr(torch.ops._C, "cpu_attention_with_kv_cache"):
        return None
    _, num_kv_heads, block_size, width = shape
    if head_size not in CPUAttentionBackend.get_supported_head_sizes() or width != 2 * head_size:
        return None
    # The kernel reads each block as [heads, slots, 2D] packed.
    if stride[3] != 1 or stride[2] != width or stride[1] != block_size * width:
        return None
    if head_size % 32 == 0 and block_size % 32 == 0:
        return "vec"
    if head_size % 16 == 0 and block_size % 16 == 0:
        return "vec16"
    return None
