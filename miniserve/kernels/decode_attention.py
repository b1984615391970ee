"""Paged decode attention (one new token per sequence): a two-stage split-KV ("flash-decoding") Triton kernel.

Stage 1: program (sequence, KV head, split) runs an online softmax over its slice of the context for all the
query heads that share the KV head (GQA), stacked into the M dimension of `tl.dot` (padded to 16 rows).
Stage 2: program (sequence, KV head) merges the splits of its query heads. Small batches with long contexts thus
still fill the GPU. With a single split, stage 1 writes the output directly.

FP8 caches are dequantized exactly in-kernel into fp16 (every e4m3 value is an fp16 value): by the hardware's
e4m3 -> fp16 conversion (e4m3fn on NVIDIA) or by moving the bit fields into an fp16, whose value is then the
FP8 value times 2^(bias - 15). That power of two and the scales are applied to the scores (k_scale) and to the
output (v_scale) rather than to every K/V element. The dots against an FP8 cache run in fp16 even for bf16
queries: a bf16 -> fp16 conversion per K/V element would make the kernel conversion-bound (H100: 16
conversions/clock/SM), while bf16 queries fit fp16 exactly (see `fp16_fit_factor`).

How V is read from an FP8 cache decides the kernel's speed. P.V runs on mma.sync (the 16-row GQA tile is too
small for wgmma), whose B operand packs two consecutive KV positions of a column into a register, while the cache
stores a position's head_dim contiguously: 16-bit tiles are transposed for free by ldmatrix.trans, 8-bit ones are
not (sm_90 has no transposing 8-bit ldmatrix), and Triton then gathers the V tile out of shared memory one byte per
load ("hw"; benchmarks/results/decode_attention_fp8_registers.md). The default on NVIDIA ("auto" = "hw-pairs",
`pv_by_pairs`) loads V as int16 words, each two adjacent head_dim columns of one position: the words are
transposed by ldmatrix.trans like a bf16 tile, then split into the even and the odd columns' fp16 values by the
same conversion instruction, and P.V runs as two dots of half the width. The same values and products per output
column; the MMA's operand packing differs from "hw", so a few bf16 outputs differ from it by an ulp, no less
accurate against a float64 reference (benchmarks/results/decode_attention_fp8_pairs_h200.json, with its speed).

The staged FP8 mode (fp8_decode="hw-staged", opt-in, slower than the pair read) converts V by the same
hardware instruction written as inline PTX. Triton cannot look through it, so it converts V in the layout the
tile was loaded in and stages the fp16 tile through shared memory for the P.V dot (ldmatrix.trans), instead of
gathering the 8-bit V tile into the dot's transposed operand layout one byte per shared-memory load, which is
what makes the byte read ("hw") issue-bound and need ~2x the registers of the bf16 one
(benchmarks/results/decode_attention_fp8_registers.md). Same instruction, same tiles, yet on the H200 a few
outputs differ by one ulp from the byte read's (`decode_attention_fp8_variants_h200.json`).

Splits: by default a sequence's context is cut into splits by its length alone (`SPLIT_TOKENS`), so its result
never depends on the batch. `decode_splits="by-batch"` sizes the splits by the batch instead
(`split_tokens_for`): many short ones when a few sequences must fill the GPU, a single one when the batch does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from miniserve.kernels.backend import is_rocm, triton_interpreter_enabled
from miniserve.kernels.dependent_launch import launch_options, release_dependents, wait_for_previous
from miniserve.kernels.fp8 import fp8_format, is_fp8
from miniserve.kernels.metadata import AttentionMetadata

LOG2E = 1.4426950408889634

KV_PLAIN, KV_FP8_BITS, KV_FP8_HW, KV_FP8_HW_STAGED, KV_FP8_HW_PAIRS = 0, 1, 2, 3, 4
FP8_DECODES = ("auto", "bits", "hw", "hw-staged", "hw-pairs")
DECODE_SPLITS = ("by-length", "by-batch")  # split_tokens_for

# Triton's interpreter runs no inline PTX: there the staged mode converts V like KV_FP8_HW (layouts are moot).
INTERPRETED = tl.constexpr(triton_interpreter_enabled())


@triton.jit
def e4m3_to_fp16_bits(byte, NAN_ALL_ONES: tl.constexpr):
    """e4m3 byte (uint8) -> fp16 holding value * 2^(bias - 15), exactly (subnormals included), NaN kept.

    The 4 exponent and 3 mantissa bits move into the fp16 fields unchanged, so only the exponent bias differs.
    NAN_ALL_ONES: e4m3fn (NaN = S.1111.111); otherwise e4m3fnuz (NaN = 0x80)."""
    b = byte.to(tl.int32)
    h = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
    if NAN_ALL_ONES:
        is_nan = (b & 0x7F) == 0x7F
    else:
        is_nan = b == 0x80
    h = tl.where(is_nan, 0x7E00, h)
    return h.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def e4m3fn_to_fp16_ptx(x):
    """e4m3fn bytes -> fp16 by the hardware conversion (cvt.rn.f16x2.e4m3x2, what Triton's own cast emits), as
    inline PTX on 4 bytes at a time. Deliberately not marked pure: Triton then cannot move the dot-operand layout
    change ahead of the conversion (it does through its own cast, to shuffle 1-byte values), see the module
    docstring."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r",
        [x],
        dtype=tl.float16,
        is_pure=False,
        pack=4,
    )


@triton.jit
def e4m3x2_to_fp16_pair(x):
    """int16 holding two e4m3fn bytes (the low one a head_dim column, the high one the next) -> their two fp16
    values, by the hardware conversion that Triton's own cast emits (the interpreter: by that cast). Marked pure,
    so Triton moves the P.V dot's operand layout change ahead of it, onto the 16-bit words (ldmatrix.trans)."""
    if INTERPRETED:
        lo = (x & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        hi = ((x >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        return lo, hi
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; cvt.rn.f16x2.e4m3x2 t, $2; mov.b32 {$0, $1}, t; }",
        "=h,=h,h",
        [x],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=1,
    )


@triton.jit
def fp16_fit_factor(q):
    """Power of two s (1.0 unless max|q| >= 2^15) such that q * s is finite in fp16.

    A bf16 value in fp16's normal range [2^-14, 65504] is exact in fp16 (fewer mantissa bits); components below
    2^-14 keep 2^-24 absolute precision, which is far below what a bf16 output can show."""
    q_max = tl.max(tl.max(tl.abs(q), 1), 0)
    exp = (q_max.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.where(exp >= 142, ((268 - exp) << 23).to(tl.float32, bitcast=True), 1.0)


@triton.jit
def load_q_tile(q_ptrs, mask, k_mult, FIT_FP16: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """The query tile in the dot's dtype, and the score multiplier that undoes any fp16 range fitting."""
    q = tl.load(q_ptrs, mask=mask, other=0)
    if FIT_FP16:
        q = q.to(tl.float32)
        shrink = fp16_fit_factor(q)
        q = q * shrink
        k_mult = k_mult / shrink
    return q.to(COMPUTE_DTYPE), k_mult


@triton.jit
def times_cache_scale(base, scale_ptr, KV_MODE: tl.constexpr, KV_FACTOR: tl.constexpr):
    """`base` times what a cache's stored values stand for: 1 for plain caches; for FP8 its scale and the
    bit-decode's factor (the multiplier of scores for K, of the output for V)."""
    mult = base
    if KV_MODE != 0:
        mult = base * tl.load(scale_ptr) * KV_FACTOR
    return mult


@triton.jit
def load_kv_tile(
    cache_ptr,
    offsets,
    mask,
    KV_MODE: tl.constexpr,
    NAN_ALL_ONES: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    STAGED: tl.constexpr = False,
):
    """Load a [BLOCK_N, HEAD_DIM_PAD] tile of a paged cache and convert it to the dot's input dtype; STAGED: by
    the opaque PTX conversion (KV_FP8_HW_STAGED's V tile); mask None: every element is in bounds."""
    if mask is None:
        x = tl.load(cache_ptr + offsets)
    else:
        x = tl.load(cache_ptr + offsets, mask=mask, other=0)
    if KV_MODE == 1:
        x = e4m3_to_fp16_bits(x, NAN_ALL_ONES)
    elif KV_MODE >= 2:
        if STAGED and not INTERPRETED:
            x = e4m3fn_to_fp16_ptx(x)
        else:
            x = x.to(tl.float8e4nv, bitcast=True)
    return x.to(COMPUTE_DTYPE)


@triton.jit
def mul_rn(x, y):
    """x * y as its own rounded fp32 multiply, which ptxas never contracts into an FMA with a later add (PTX
    `mul.rn`). Where the result feeds a subtraction directly, a plain `*` may be fused into one FFMA there (one
    rounding instead of two): this keeps the two roundings a masked tile gets (its select sits in between)."""
    if INTERPRETED:
        return x * y
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def page_slots(block_tables_ptr, pos, valid, BLOCK_SIZE: tl.constexpr):
    """(physical block, offset in block) of each token position; int64: caches can exceed 2^31 elements."""
    page = tl.load(block_tables_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return page, pos % BLOCK_SIZE


@triton.jit
def zero_acc(ROWS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, KV_MODE: tl.constexpr):
    """The unnormalized output and its partner: [ROWS, HEAD_DIM_PAD] and an unused placeholder, or for V read in
    byte pairs (KV_FP8_HW_PAIRS) the even and the odd head_dim columns, [ROWS, HEAD_DIM_PAD // 2] each."""
    if KV_MODE == 4:
        acc, acc_odd = tl.zeros([ROWS, HEAD_DIM_PAD // 2], tl.float32), tl.zeros([ROWS, HEAD_DIM_PAD // 2], tl.float32)
    else:
        acc, acc_odd = tl.zeros([ROWS, HEAD_DIM_PAD], tl.float32), tl.zeros([1], tl.float32)
    return acc, acc_odd


@triton.jit
def joined_acc(acc, acc_odd, KV_MODE: tl.constexpr):
    """zero_acc's pair after the loop -> [ROWS, HEAD_DIM_PAD] in head_dim order."""
    if KV_MODE == 4:
        acc = tl.interleave(acc, acc_odd)
    return acc


@triton.jit
def pv_by_pairs(p, alpha, acc, acc_odd, v_cache_ptr, rows, rows_ok, HALF: tl.constexpr, COMPUTE_DTYPE, DOT_PRECISION):
    """(acc, acc_odd) * alpha + P.V for an e4m3fn V tile read as int16 words of two head_dim columns: the even
    and the odd columns are two dots of half the width, so no 8-bit value is ever gathered across threads (sm_90
    has no transposing 8-bit ldmatrix; the byte read, "hw", gathers V one byte per shared-memory load). Each output
    column sums the same products in the same K order as one dot; only the MMA's operand packing differs (the
    bf16 outputs move by an ulp, rarely: decode_attention_fp8_pairs_h200.json). rows: each position's element
    offset (even: head_dim is even); rows_ok: [BLOCK_N, 1] positions in bounds (None: all)."""
    offsets = (rows // 2)[:, None] + tl.arange(0, HALF)[None, :]
    words = v_cache_ptr.to(tl.pointer_type(tl.int16)) + offsets
    if rows_ok is None:
        v2 = tl.load(words)
    else:
        v2 = tl.load(words, mask=rows_ok, other=0)
    v_even, v_odd = e4m3x2_to_fp16_pair(v2)
    p = p.to(COMPUTE_DTYPE)
    acc = acc * alpha[:, None] + tl.dot(p, v_even.to(COMPUTE_DTYPE), input_precision=DOT_PRECISION)
    acc_odd = acc_odd * alpha[:, None] + tl.dot(p, v_odd.to(COMPUTE_DTYPE), input_precision=DOT_PRECISION)
    return acc, acc_odd


@triton.jit
def attend_kv_tile(
    q,
    k_mult,
    m_i,
    l_i,
    acc,
    acc_odd,
    k_cache_ptr,
    v_cache_ptr,
    page,
    slot,
    kv_head,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    d,
    kv_mask,
    visible,
    KV_MODE: tl.constexpr,
    NAN_ALL_ONES: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr = True,
    SAME_KV_OFFSETS: tl.constexpr = False,
    FUSED_SCALE: tl.constexpr = False,
    rows_ok=None,
):
    """One online-softmax step over a tile of cached K/V (the loop body of the decode and extend kernels, so a
    query gets the same arithmetic from both). Scores are in log2 units; `visible` masks them to -inf.
    Returns the updated (running max, running sum, unnormalized output, its partner): `acc, acc_odd` come from
    zero_acc (the odd columns for KV_FP8_HW_PAIRS, which also needs `rows_ok`, [BLOCK_N, 1] positions in
    bounds or None, and an unpadded head_dim).

    Not MASKED (the extend kernel's tiles below the causal diagonal): every score is visible, `visible` is not
    applied (may be None); a None `kv_mask`: every K/V element is in bounds. Its scores are scaled by `mul_rn`,
    so they round as a masked tile's do (a plain multiply would be fused into the exponent's subtraction: no
    fewer instructions, as the max needs the product anyway, but last-bit differences). FUSED_SCALE (unmasked
    tiles only): the max of the unscaled scores times k_mult (> 0), and each exponent's argument as one FFMA
    (score * k_mult - max), as in Triton's fused-attention tutorial: one instruction per score fewer, different
    roundings. SAME_KV_OFFSETS: the V cache has the K cache's strides, and V reuses K's element offsets."""
    rows = page * stride_kb + slot * stride_ks + kv_head * stride_kh
    offsets = rows[:, None] + d[None, :]
    k = load_kv_tile(k_cache_ptr, offsets, kv_mask, KV_MODE, NAN_ALL_ONES, COMPUTE_DTYPE)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if FUSED_SCALE:
        m_new = tl.maximum(m_i, tl.max(s, 1) * k_mult)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * k_mult - m_new[:, None])
    else:
        if MASKED:
            s = tl.where(visible, s * k_mult, float("-inf"))
        else:
            s = mul_rn(s, k_mult)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if not SAME_KV_OFFSETS:
        rows = page * stride_vb + slot * stride_vs + kv_head * stride_vh
        offsets = rows[:, None] + d[None, :]
    if KV_MODE == 4:
        acc, acc_odd = pv_by_pairs(
            p, alpha, acc, acc_odd, v_cache_ptr, rows, rows_ok, d.shape[0] // 2, COMPUTE_DTYPE, DOT_PRECISION
        )
    else:
        v = load_kv_tile(v_cache_ptr, offsets, kv_mask, KV_MODE, NAN_ALL_ONES, COMPUTE_DTYPE, KV_MODE == 3)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE_DTYPE), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc, acc_odd


@triton.jit(do_not_specialize=["stride_bt"])  # eager steps' block tables vary in width: one compile
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
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
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr,
    KV_MODE: tl.constexpr,
    NAN_ALL_ONES: tl.constexpr,
    KV_FACTOR: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FIT_FP16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    release_dependents(USE_PDL)
    wait_for_previous(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # A sequence's split count depends on its own length and SPLIT_TOKENS only, never on the grid; with the
    # default SPLIT_TOKENS (decode_splits="by-length") a query gets bit-identical results in any batch, eager or
    # CUDA-graph (speculative verification runs its tokens here too, as decode queries:
    # model_runner.ModelRunner._for_kernels, so it matches plain decoding). "by-batch" trades that away.
    num_splits = tl.minimum(tl.cdiv(seq_len, SPLIT_TOKENS), NUM_SPLITS)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    if split < num_splits:  # a graph's grid has splits for the longest possible context: the rest do nothing
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM_PAD)
        q_head = kv_head * GROUP + g
        d_mask = d < HEAD_DIM
        q_mask = (g < GROUP)[:, None] & d_mask[None, :]
        k_mult = times_cache_scale(qk_scale, k_scale_ptr, KV_MODE, KV_FACTOR)  # scores in log2 units: exp2 below
        q_ptrs = q_ptr + seq * stride_qt + q_head[:, None] * stride_qh + d[None, :]
        q, k_mult = load_q_tile(q_ptrs, q_mask, k_mult, FIT_FP16, COMPUTE_DTYPE)
        block_table = block_tables_ptr + seq * stride_bt

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc, acc_odd = zero_acc(GROUP_PAD, HEAD_DIM_PAD, KV_MODE)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            kv_mask = valid[:, None] & d_mask[None, :]
            page, slot = page_slots(block_table, pos, valid, BLOCK_SIZE)
            m_i, l_i, acc, acc_odd = attend_kv_tile(
                q, k_mult, m_i, l_i, acc, acc_odd, k_cache_ptr, v_cache_ptr, page, slot, kv_head, stride_kb,
                stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, d, kv_mask, valid[None, :], KV_MODE,
                NAN_ALL_ONES, COMPUTE_DTYPE, DOT_PRECISION, rows_ok=valid[:, None],
            )  # fmt: skip
        acc = joined_acc(acc, acc_odd, KV_MODE)

        if num_splits == 1:  # the whole context in one program: normalise and write the output here
            out = acc * (times_cache_scale(1.0, v_scale_ptr, KV_MODE, KV_FACTOR) / l_i)[:, None]
            o_ptrs = out_ptr + seq * stride_ot + q_head[:, None] * stride_oh + d[None, :]
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
        else:
            # partials: acc [B, Hq, S, D_PAD], (m, l) [B, Hq, S, 2] -- unnormalized, merged by stage 2
            row = (seq * GROUP * tl.num_programs(1) + q_head) * NUM_SPLITS + split
            tl.store(part_acc_ptr + row[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=(g < GROUP)[:, None])
            tl.store(part_ml_ptr + row * 2, m_i, mask=g < GROUP)
            tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g < GROUP)


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    seq_lens_ptr,
    v_scale_ptr,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr,
    KV_MODE: tl.constexpr,
    KV_FACTOR: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Stage 2, one program per (sequence, KV head): the GROUP query heads stage 1 computed together, so a
    batch needs GROUP times fewer programs than one per query head (a wave of tiny programs cost ~5-15 us a
    layer on an H200)."""
    release_dependents(USE_PDL)
    wait_for_previous(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_splits = tl.minimum(tl.cdiv(tl.load(seq_lens_ptr + seq), SPLIT_TOKENS), NUM_SPLITS)
    if num_splits > 1:  # one-split sequences were written by stage 1
        g = tl.arange(0, GROUP_PAD)
        split = tl.arange(0, NUM_SPLITS)
        head = kv_head * GROUP + g
        # rows past the group or the sequence's own splits were never written
        mine = (g < GROUP)[:, None] & (split < num_splits)[None, :]
        row = (seq * GROUP * tl.num_programs(1) + head)[:, None] * NUM_SPLITS + split[None, :]
        d = tl.arange(0, HEAD_DIM_PAD)
        m = tl.load(part_ml_ptr + row * 2, mask=mine, other=float("-inf"))
        l_sum = tl.load(part_ml_ptr + row * 2 + 1, mask=mine, other=0.0)
        m_max = tl.max(m, 1)
        w = tl.where(l_sum > 0, tl.exp2(m - m_max[:, None]), 0.0)  # empty splits (m = -inf, l = 0) weigh nothing
        acc = tl.load(
            part_acc_ptr + row[:, :, None] * HEAD_DIM_PAD + d[None, None, :], mask=mine[:, :, None], other=0.0
        )
        v_mult = times_cache_scale(1.0, v_scale_ptr, KV_MODE, KV_FACTOR)
        out = tl.sum(acc * w[:, :, None], 1) * (v_mult / tl.sum(l_sum * w, 1))[:, None]
        o_ptrs = out_ptr + seq * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :])


def kv_block_n(cache_dtype: torch.dtype) -> int:
    """KV positions per inner step, shared by the decode and extend kernels: both then accumulate a query's
    scores and values in the same chunks, the same arithmetic (on a GPU the extend kernel's 64-row tiles run on
    wgmma, whose sums differ from the decode kernel's mma.sync in the last bit for about one output in 10^4:
    benchmarks/results/kernel_checks_decode_vs_extend_h200.json). H100 sweep: 128 for FP8 (~16 KiB of K+V), else
    64; 16 in the interpreter, which pays per masked element."""
    if triton_interpreter_enabled():
        return 16
    return 128 if is_fp8(cache_dtype) else 64


def kv_mode(cache_dtype: torch.dtype, device: torch.device, fp8_decode: str = "auto") -> tuple[int, bool, float]:
    """(KV_MODE, NAN_ALL_ONES, KV_FACTOR) for a cache dtype.

    "auto": e4m3fn on NVIDIA uses the hardware fp8 -> fp16 conversion (two values per instruction), reading V in
    byte pairs ("hw-pairs", `pv_by_pairs`; launchers fall back to "hw" where it cannot: `pairs_or_hw`); every
    other FP8 case (fnuz, ROCm, the interpreter) uses the exact bit-field decode ("bits"), whose fp16 is off by
    2^(15 - bias). "hw", "hw-staged" and "hw-pairs" (module docstring) ask for the hardware conversion of e4m3fn
    explicitly ("hw": V gathered byte by byte, the default before "hw-pairs"); in the interpreter (tests) they
    run its conversion, which agrees with the hardware's except on NaN."""
    if not is_fp8(cache_dtype):
        return KV_PLAIN, False, 1.0
    if fp8_decode not in FP8_DECODES:
        raise ValueError(f"fp8_decode must be one of {FP8_DECODES}, got {fp8_decode!r}")
    fmt = fp8_format(cache_dtype)
    nan_all_ones = cache_dtype == torch.float8_e4m3fn
    hw_modes = {"hw": KV_FP8_HW, "hw-staged": KV_FP8_HW_STAGED, "hw-pairs": KV_FP8_HW_PAIRS}
    if fp8_decode in hw_modes:
        if not nan_all_ones or is_rocm():
            raise ValueError(f"fp8_decode={fp8_decode!r} needs float8_e4m3fn on NVIDIA, not {cache_dtype} here")
        return hw_modes[fp8_decode], True, 1.0
    hw = nan_all_ones and device.type == "cuda" and not is_rocm() and not triton_interpreter_enabled()
    if hw and fp8_decode == "auto":
        return KV_FP8_HW_PAIRS, True, 1.0
    return KV_FP8_BITS, nan_all_ones, float(2 ** (15 - fmt.exponent_bias))


def pairs_or_hw(mode: int, head_dim: int, value_cache: torch.Tensor, rows: int) -> int:
    """KV_FP8_HW_PAIRS where it applies, else the byte-by-byte KV_FP8_HW; other modes unchanged. It applies where V
    can be read in int16 words of two head_dim columns (an unpadded head_dim: a power of two from 16, and 2-byte
    aligned rows) and where the P.V dot runs on mma.sync: tiles of fewer than 64 query rows (decode's GQA tile,
    the extend kernel's 16-row tiles). From 64 rows it runs on wgmma, which takes V from shared memory anyway, and
    two dots there cost registers (offline, sm_90, extend at head_dim 64: 168 -> 236)."""
    if mode != KV_FP8_HW_PAIRS:
        return mode
    aligned = value_cache.data_ptr() % 2 == 0 and all(s % 2 == 0 for s in value_cache.stride()[:3])
    fits = head_dim >= 16 and head_dim & (head_dim - 1) == 0 and aligned and rows < 64
    return mode if fits else KV_FP8_HW


def compute_dtype(q: torch.Tensor, cache_dtype: torch.dtype) -> dict:
    """tl.dot's input dtype: fp32 for fp32 queries; fp16 against FP8 caches (module docstring); else the
    queries' own dtype, except bf16 in the interpreter, whose numpy dot has no bf16 (fp32 there)."""
    if q.dtype == torch.float32:
        return dict(COMPUTE_DTYPE=tl.float32, DOT_PRECISION="ieee", FIT_FP16=False)
    if is_fp8(cache_dtype):
        return dict(COMPUTE_DTYPE=tl.float16, DOT_PRECISION=None, FIT_FP16=q.dtype != torch.float16)
    if q.dtype == torch.float16:
        return dict(COMPUTE_DTYPE=tl.float16, DOT_PRECISION=None, FIT_FP16=False)
    if triton_interpreter_enabled():
        return dict(COMPUTE_DTYPE=tl.float32, DOT_PRECISION="ieee", FIT_FP16=False)
    return dict(COMPUTE_DTYPE=tl.bfloat16, DOT_PRECISION=None, FIT_FP16=False)


def register_cap(maxnreg: int | None) -> dict:
    """The launch option capping registers per thread (Triton's `maxnreg`), only when asked for (None or 0: no cap)."""
    return {"maxnreg": maxnreg} if maxnreg else {}


EXACT_FP8_REGISTERS = 128  # the byte read ("hw")
PAIRS_FP8_REGISTERS = 96  # the pair read ("auto" on NVIDIA)


def default_register_cap(head_dim: int, mode: int, device: torch.device) -> int:
    """The decode kernel's register cap by shape and the V read it runs (`mode`, after `pairs_or_hw`; 0: none). An FP8
    cache read by the hardware conversion with V gathered byte by byte ("hw") needs ~200 registers a thread at head_dim
    128 (two programs an SM) and 137 at 64 (three); capped at 128, four fit (at head_dim 128 with some spilling), with
    the same arithmetic: bit-identical output, and on the H200 1.16-1.28x faster than uncapped at head_dim 128
    (Llama-3.1-8B heads at 8 and 64 x 4k, Qwen3-0.6B at 256 x 1.1k; a cap of 168 gained less), no slower at head_dim 64
    (Llama-3.2-1B, 64 x 640): decode_attention_fp8_variants_h200.json and decode_attention_fp8_r128_h200.json. V read in
    byte pairs ("auto": "hw-pairs") needs 156 at head_dim 128 and 110 at 64: capped at 96 (16-40 bytes of spill), five
    programs an SM, the same bits, 1.05x faster than at 128 at Llama-3.1-8B's 64 x 4k and Qwen3-0.6B's 256 x 1.1k,
    1.03-1.05x at Llama-3.2-1B's batch 128-256, equal at its 64 (decode_attention_fp8_pairs_h200.json). Other head sizes
    were not measured: none. NVIDIA only."""
    nvidia = device.type == "cuda" and not is_rocm() and not triton_interpreter_enabled()
    if not (head_dim in (64, 128) and nvidia):
        return 0
    return {KV_FP8_HW_PAIRS: PAIRS_FP8_REGISTERS, KV_FP8_HW: EXACT_FP8_REGISTERS}.get(mode, 0)


def check_kernel_inputs(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("the Triton attention kernels need caches whose head_dim is contiguous")
    if key_cache.dtype != value_cache.dtype or key_cache.shape != value_cache.shape:
        raise ValueError(f"key/value caches differ: {key_cache.dtype} {key_cache.shape} vs {value_cache.dtype}")


def cache_view(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8) if is_fp8(cache.dtype) else cache


def layout_strides(q: torch.Tensor, out: torch.Tensor, meta: AttentionMetadata, kc: torch.Tensor, vc: torch.Tensor):
    """The strides the decode and extend kernels take, in their order: q and out (token, head), the block
    table's row, and each cache's (block, slot, head)."""
    return (
        *q.stride()[:2], *out.stride()[:2], meta.block_tables.stride(0), *kc.stride()[:3], *vc.stride()[:3]
    )  # fmt: skip


SPLIT_TOKENS = 512  # a sequence gets one split per 512 tokens of context, at most MAX_SPLITS
# A CUDA graph launches MAX_SPLITS programs per sequence and KV head (for the longest context it may meet), and
# the ones past a sequence's own splits exit at once: 64 of them cost ~20 us per layer at batch 64 on an H200.
MAX_SPLITS = 16
REDUCE_WARPS = 4  # stage 2: one (sequence, query head) of at most MAX_SPLITS x head_dim partials a program


def choose_num_splits(max_seq_len: int, split_tokens: int = SPLIT_TOKENS) -> int:
    """The grid's split dimension: enough for the longest sequence; each sequence uses cdiv(len, split_tokens) of
    them, at most MAX_SPLITS (a long context then gets longer splits). Which split_tokens: split_tokens_for."""
    return triton.next_power_of_2(max(1, min(triton.cdiv(max_seq_len, split_tokens), MAX_SPLITS)))


def split_partials(out: torch.Tensor, splits: int, head_dim_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's fp32 partial outputs and (max, sum) pairs per split; with one split stage 1 writes `out` and
    these are unused placeholders."""
    if splits == 1:
        return out, out
    num_seqs, num_q_heads, _ = out.shape
    acc = torch.empty(num_seqs, num_q_heads, splits, head_dim_pad, dtype=torch.float32, device=out.device)
    return acc, torch.empty(num_seqs, num_q_heads, splits, 2, dtype=torch.float32, device=out.device)


def split_tokens_for(decode_splits: str, num_seqs: int, num_kv_heads: int, block_n: int) -> int:
    """Tokens a split. "by-length": SPLIT_TOKENS at every batch size. "by-batch": from the (sequence, KV head)
    programs the batch brings before splitting: up to 8 (batch 1 at 8 KV heads) want the shortest splits, up to
    64 short ones, from 1024 on one split per sequence up to 1024 tokens (no merge); H200 kernel timings:
    `decode_attention_split_sizes_h200.json`. At least one KV tile (block_n): a shorter split would be empty."""
    if decode_splits not in DECODE_SPLITS:
        raise ValueError(f"decode_splits must be one of {DECODE_SPLITS}, got {decode_splits!r}")
    if decode_splits == "by-length":
        return SPLIT_TOKENS
    programs = num_seqs * num_kv_heads
    tokens = 64 if programs <= 8 else 128 if programs <= 64 else 1024 if programs >= 1024 else SPLIT_TOKENS
    return max(tokens, block_n)


def decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    sm_scale: float,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    fp8_decode: str = "auto",
    split_tokens: int | None = None,
    maxnreg: int | None = None,
    reduce_warps: int = REDUCE_WARPS,
    decode_splits: str = "by-length",
    pdl: bool = False,
) -> torch.Tensor:
    """Decode attention: q [num_seqs, num_q_heads, head_dim] -> q's shape and dtype; see the module docstring.
    maxnreg: a register cap for ptxas (None: default_register_cap's, 0: none); split_tokens: None = by
    `decode_splits` (split_tokens_for); reduce_warps: stage 2's; pdl: launch both stages as programmatic
    dependents (dependent_launch.py)."""
    (num_seqs, num_q_heads, head_dim), (_, block_size, num_kv_heads, _) = q.shape, key_cache.shape
    group = num_q_heads // num_kv_heads
    check_kernel_inputs(key_cache, value_cache)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    mode, nan_all_ones, kv_factor = kv_mode(key_cache.dtype, q.device, fp8_decode)
    group_pad = max(16, triton.next_power_of_2(group))
    mode = pairs_or_hw(mode, head_dim, value_cache, group_pad)
    maxnreg = default_register_cap(head_dim, mode, q.device) if maxnreg is None else maxnreg
    block_n = block_n or kv_block_n(key_cache.dtype)
    split_tokens = split_tokens or split_tokens_for(decode_splits, num_seqs, num_kv_heads, block_n)
    splits = num_splits or choose_num_splits(meta.max_seq_len, split_tokens)
    head_dim_pad = triton.next_power_of_2(head_dim)
    part_acc, part_ml = split_partials(out, splits, head_dim_pad)
    kc, vc = cache_view(key_cache), cache_view(value_cache)
    _decode_split_kernel[(num_seqs, num_kv_heads, splits)](
        q, kc, vc, meta.block_tables, meta.seq_lens, k_scale, v_scale, out, part_acc, part_ml, sm_scale * LOG2E,
        *layout_strides(q, out, meta, kc, vc),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_N=block_n, BLOCK_SIZE=block_size, NUM_SPLITS=splits, SPLIT_TOKENS=split_tokens,
        KV_MODE=mode, NAN_ALL_ONES=nan_all_ones, KV_FACTOR=kv_factor, **compute_dtype(q, key_cache.dtype),
        USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages, **register_cap(maxnreg), **launch_options(pdl),
    )  # fmt: skip
    if splits > 1:
        _merge_splits(
            part_acc, part_ml, out, meta, v_scale, group, splits, split_tokens, mode, kv_factor, reduce_warps, pdl
        )
    return out


def _merge_splits(
    part_acc,
    part_ml,
    out,
    meta,
    v_scale,
    group: int,
    splits: int,
    split_tokens: int,
    mode: int,
    kv_factor: float,
    warps: int,
    pdl: bool,
):
    """Stage 2: one program per (sequence, KV head) merges its `group` query heads' split partials into `out`."""
    num_seqs, num_q_heads, head_dim = out.shape
    _decode_reduce_kernel[(num_seqs, num_q_heads // group)](
        part_acc,
        part_ml,
        out,
        meta.seq_lens,
        v_scale,
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=part_acc.shape[-1],
        NUM_SPLITS=splits,
        SPLIT_TOKENS=split_tokens,
        KV_MODE=mode,
        KV_FACTOR=kv_factor,
        USE_PDL=pdl,
        num_warps=warps,
        **launch_options(pdl),
    )
