"""Paged extend attention: several new tokens per sequence (prefill, chunked prefill, speculative verify).

Program (query block, query head, sequence) runs an online softmax over the sequence's cached pages and,
causally, over the new tokens themselves: query j of a sequence with q_len new tokens and seq_len total sees
KV positions <= seq_len - q_len + j (see metadata.py). Ragged lengths share one launch; programs whose query
block lies past their sequence's q_len exit at once. K/V come from the paged cache only (the new tokens were
written there first) and are dequantized like in the decode kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from miniserve.kernels.backend import is_rocm, triton_interpreter_enabled
from miniserve.kernels.decode_attention import (
    LOG2E,
    attend_kv_tile,
    cache_view,
    check_kernel_inputs,
    compute_dtype,
    is_fp8,
    joined_acc,
    kv_block_n,
    kv_mode,
    layout_strides,
    load_q_tile,
    page_slots,
    pairs_or_hw,
    register_cap,
    times_cache_scale,
    zero_acc,
)
from miniserve.kernels.metadata import AttentionMetadata


@triton.jit(do_not_specialize=["stride_bt"])  # the block table's width changes every step: one compile
def _extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    out_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    KV_MODE: tl.constexpr,
    NAN_ALL_ONES: tl.constexpr,
    KV_FACTOR: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FIT_FP16: tl.constexpr,
    GROUP_PACK: tl.constexpr = 1,
    SPLIT_DIAG: tl.constexpr = 0,
    REVERSE: tl.constexpr = False,
    SAME_KV_STRIDES: tl.constexpr = False,
):
    # Variants (launcher parameters; the defaults give the kernel described in the module docstring):
    # GROUP_PACK > 1: one program per KV head serves its GROUP query heads (padded to GROUP_PACK), stacked into
    #   the dot's M dimension (row r = token r // GROUP_PACK, head r % GROUP_PACK): a KV tile is loaded once per
    #   KV head instead of once per query head; BLOCK_M counts tokens, the tile has BLOCK_M * GROUP_PACK rows.
    # SPLIT_DIAG: tiles wholly below the causal diagonal (visible to every row of the block) run first, in a
    #   loop without the causal mask, the position bounds or the load masks; the rest as before. Same tiles in
    #   the same order, the same roundings (attend_kv_tile's mul_rn). SPLIT_DIAG 2 ("fma"): those tiles scale
    #   their scores inside the exponent's FFMA (attend_kv_tile's FUSED_SCALE: other roundings).
    # REVERSE: grid (head, query block, sequence), query blocks longest first (the last ones see the most KV).
    # SAME_KV_STRIDES: the V cache's strides are the K cache's (computed once, V reuses K's offsets).
    if REVERSE:
        head = tl.program_id(0)
        block_m = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        block_m = tl.program_id(0)
        head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if block_m * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len  # cached tokens before the new ones
    if SAME_KV_STRIDES:
        stride_vb, stride_vs, stride_vh = stride_kb, stride_ks, stride_kh

    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < HEAD_DIM
    if GROUP_PACK > 1:
        r = tl.arange(0, BLOCK_M * GROUP_PACK)
        m = block_m * BLOCK_M + r // GROUP_PACK
        g = r % GROUP_PACK
        kv_head = head  # the grid's head axis counts KV heads
        q_head = kv_head * GROUP + g
        row_ok = (m < q_len) & (g < GROUP)
    else:
        m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        kv_head = head // GROUP
        q_head = head
        row_ok = m < q_len
    q_mask = row_ok[:, None] & d_mask[None, :]
    q_rows = (q_start + m).to(tl.int64)
    k_mult = times_cache_scale(qk_scale, k_scale_ptr, KV_MODE, KV_FACTOR)  # scores in log2 units: exp2 below
    if GROUP_PACK > 1:
        q_ptrs = q_ptr + q_rows[:, None] * stride_qt + q_head[:, None] * stride_qh + d[None, :]
    else:
        q_ptrs = q_ptr + q_rows[:, None] * stride_qt + q_head * stride_qh + d[None, :]
    q, k_mult = load_q_tile(q_ptrs, q_mask, k_mult, FIT_FP16, COMPUTE_DTYPE)
    block_table = block_tables_ptr + seq * stride_bt
    last_visible = prefix + m  # per query row: the last KV position it may attend to

    ROWS: tl.constexpr = BLOCK_M * GROUP_PACK
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc, acc_odd = zero_acc(ROWS, HEAD_DIM_PAD, KV_MODE)
    end = tl.minimum(seq_len, prefix + (block_m + 1) * BLOCK_M)  # past the block's last query: all masked
    start = 0
    if SPLIT_DIAG:
        # tiles [0, start) hold positions <= prefix + block_m * BLOCK_M, the block's first query: all visible
        start = (prefix + block_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        if HEAD_DIM == HEAD_DIM_PAD:
            in_bounds = None  # no load masks at all
        else:
            in_bounds = d_mask[None, :]
        for n0 in range(0, start, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            page = tl.load(block_table + pos // BLOCK_SIZE).to(tl.int64)
            m_i, l_i, acc, acc_odd = attend_kv_tile(
                q, k_mult, m_i, l_i, acc, acc_odd, k_cache_ptr, v_cache_ptr, page, pos % BLOCK_SIZE, kv_head, stride_kb,
                stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, d, in_bounds, None, KV_MODE, NAN_ALL_ONES,
                COMPUTE_DTYPE, DOT_PRECISION, False, SAME_KV_STRIDES, SPLIT_DIAG == 2,
            )  # fmt: skip
    for n0 in range(start, end, BLOCK_N):  # the running max stays finite: position 0 is visible to every row
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        kv_mask = valid[:, None] & d_mask[None, :]
        page, slot = page_slots(block_table, pos, valid, BLOCK_SIZE)
        visible = valid[None, :] & (pos[None, :] <= last_visible[:, None])  # causal
        m_i, l_i, acc, acc_odd = attend_kv_tile(
            q, k_mult, m_i, l_i, acc, acc_odd, k_cache_ptr, v_cache_ptr, page, slot, kv_head, stride_kb, stride_ks,
            stride_kh, stride_vb, stride_vs, stride_vh, d, kv_mask, visible, KV_MODE, NAN_ALL_ONES, COMPUTE_DTYPE,
            DOT_PRECISION, SAME_KV_OFFSETS=SAME_KV_STRIDES, rows_ok=valid[:, None],
        )  # fmt: skip
    acc = joined_acc(acc, acc_odd, KV_MODE)

    out = acc * (times_cache_scale(1.0, v_scale_ptr, KV_MODE, KV_FACTOR) / l_i)[:, None]
    if GROUP_PACK > 1:
        o_ptrs = out_ptr + q_rows[:, None] * stride_ot + q_head[:, None] * stride_oh + d[None, :]
    else:
        o_ptrs = out_ptr + q_rows[:, None] * stride_ot + q_head * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def extend_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    sm_scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fp8_decode: str = "auto",
    maxnreg: int | None = None,
    gqa_pack: bool = False,
    split_diag: bool | str | None = None,
    reverse: bool = False,
    same_kv_strides: bool | None = None,
) -> torch.Tensor:
    """Extend attention: q [num_tokens, num_q_heads, head_dim], packed by meta.query_start_loc -> the
    same shape. Launch parameters left None: launch_config's (by shape); variants: _variant_constants."""
    (num_tokens, num_q_heads, head_dim), (_, block_size, num_kv_heads, _) = q.shape, key_cache.shape
    check_kernel_inputs(key_cache, value_cache)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    cfg = _launch(head_dim, key_cache.dtype, meta.max_query_len, q.device, block_m=block_m, num_warps=num_warps,
                  num_stages=num_stages, maxnreg=maxnreg, split_diag=split_diag,
                  same_kv_strides=same_kv_strides)  # fmt: skip
    block_n = block_n or kv_block_n(key_cache.dtype)
    mode, nan_all_ones, kv_factor = kv_mode(key_cache.dtype, q.device, fp8_decode)
    kc, vc = cache_view(key_cache), cache_view(value_cache)
    group = num_q_heads // num_kv_heads
    pack = triton.next_power_of_2(group) if gqa_pack and group > 1 else 1
    mode = pairs_or_hw(mode, head_dim, value_cache, cfg["block_m"] * pack)
    heads = num_kv_heads if pack > 1 else num_q_heads
    blocks = triton.cdiv(meta.max_query_len, cfg["block_m"])
    grid = (heads, blocks, meta.num_seqs) if reverse else (blocks, heads, meta.num_seqs)
    same_strides = cfg["same_kv_strides"] and kc.stride() == vc.stride()
    variant = _variant_constants(pack, cfg["split_diag"], reverse, same_strides)
    _extend_kernel[grid](
        q, kc, vc, meta.block_tables, meta.query_start_loc, meta.seq_lens, k_scale, v_scale, out, sm_scale * LOG2E,
        *layout_strides(q, out, meta, kc, vc),
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_M=cfg["block_m"],
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        KV_MODE=mode,
        NAN_ALL_ONES=nan_all_ones,
        KV_FACTOR=kv_factor,
        **compute_dtype(q, key_cache.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **register_cap(cfg["maxnreg"]),
        **variant,
    )  # fmt: skip
    return out


def _launch(head_dim: int, cache_dtype: torch.dtype, max_query_len: int, device: torch.device, **asked) -> dict:
    """launch_config's choices, with what the caller asked for (each parameter not None) in their place."""
    cfg = launch_config(head_dim, cache_dtype, max_query_len, device)
    cfg |= {k: v for k, v in asked.items() if v is not None}
    if cfg["split_diag"] is True and is_rocm() and not triton_interpreter_enabled():  # (launch_config: never there)
        raise ValueError("split_diag rounds through PTX's mul.rn, an NVIDIA instruction: not on ROCm")
    return cfg


LONG_QUERY = 4096  # new tokens in a launch from which long-prompt tiles pay (H200: equal at 2048, 1.6x at 8192)


def launch_config(head_dim: int, cache_dtype: torch.dtype, max_query_len: int, device: torch.device) -> dict:
    """Tile sizes and variants by shape, from the H200 sweep of a 32k prompt in 8192-token chunks and of 512- and
    2048-token prompts (benchmarks/results/extend_attention_variants_h200.json). Every choice here computes the
    same bits (same BLOCK_N tiles in the same order; gpu_kernels.py --checks extend_variants): only speed differs.
    - Everywhere: the diagonal split (no causal masks below the diagonal) and V's offsets shared with K's: 1.1-1.35x.
    - Long bf16/fp16 prompts at head_dim 128 on NVIDIA: 128-row query tiles, 8 warps, 3 stages, 128 registers a
      thread (two programs an SM): 1.6x the 64-row tile at 32k (Qwen3-0.6B and Llama-3.1-8B heads). FP8 caches
      with these tiles were 1.3-2.7x slower (the byte-wise dequantization needs the registers), short prompts
      no faster: they keep 64 rows and 4 warps.
    - FP8 caches at head_dim 64 on NVIDIA: 168 registers a thread, three programs an SM instead of two, no spills
      (the default needs 185): 1.09x at 2048-token prompts, 1.02x at 512, of the Llama-3.2-1B shape (at head_dim
      128 the cap slowed Qwen3-0.6B's by 1.3x: not there; extend_attention_fp8_cap_*_h200.json).
    - The interpreter: 16-row tiles (it pays per program and per masked element alike).
    - ROCm: the launch before (the split's unmasked tiles round through PTX's mul.rn, and nothing was measured there).
    Keys: block_m, num_warps, num_stages, maxnreg, split_diag, same_kv_strides (extend_attention's parameters)."""
    cfg = dict(block_m=64, num_warps=4, num_stages=2, maxnreg=None, split_diag=True, same_kv_strides=True)
    if triton_interpreter_enabled():
        cfg["block_m"] = 16
    elif device.type != "cuda" or is_rocm():
        cfg.update(split_diag=False, same_kv_strides=False)
    elif max_query_len >= LONG_QUERY and head_dim == 128 and not is_fp8(cache_dtype):
        cfg.update(block_m=128, num_warps=8, num_stages=3, maxnreg=128)
    elif head_dim == 64 and is_fp8(cache_dtype):
        cfg["maxnreg"] = 168
    return cfg


def _variant_constants(pack: int, split_diag: bool | str, reverse: bool, same_kv_strides: bool) -> dict:
    """The kernel constants of the variants asked for, and only those: a launch without variants passes none (so it
    compiles to the kernel before them). Kernel comments and benchmarks/results/extend_attention_registers.md
    say more. gqa_pack: a program per KV head and block_m tokens, its query heads stacked into the dot's rows
    (block_m * next_power_of_2(group) rows); split_diag: the tiles below the causal diagonal without masks ("fma":
    and their score scaling folded into the exponent's FFMA, which changes roundings); reverse: the longest query
    blocks first; same_kv_strides: V's offsets reuse K's (when the two caches' strides agree, else ignored). None
    changes which KV positions a query accumulates in which order (same BLOCK_N tiles)."""
    if split_diag not in (False, True, "fma"):
        raise ValueError(f"split_diag must be False, True or 'fma', got {split_diag!r}")
    variant: dict = {}
    if pack > 1:
        variant["GROUP_PACK"] = pack
    if split_diag:
        variant["SPLIT_DIAG"] = 2 if split_diag == "fma" else 1
    if reverse:
        variant["REVERSE"] = True
    if same_kv_strides:
        variant["SAME_KV_STRIDES"] = True
    return variant
