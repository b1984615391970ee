"""Fused KV write: one Triton launch scales, quantizes and scatters K and V of every new token into its page,
rotating q and k first when the layer passes a `Rope` (layer_ops' rotary arithmetic: one launch a layer fewer).

The FP8 bytes are built with integer arithmetic only, so that they are bit-identical to
`fp8.quantize_fp8_reference` on every backend (NVIDIA, AMD, the CPU interpreter):

* `tl.math.div_rn` is the IEEE-rounded division (a plain `/` is approximate on NVIDIA), and a power-of-two
  scale an exact multiply by its reciprocal (`divide_rn`);
* NaN test and clamp act on the integer magnitude bits (for non-negative floats the integer order is the
  float order), which sidesteps the backend-dependent NaN semantics of `tl.minimum` on floats;
* the e4m3 code is assembled from bits; its rounding is one IEEE fp32 addition (see `quantize_e4m3_bits`),
  so no fp8 cast of any backend (nor the interpreter's, which rounds wrongly) is trusted. One add instead of
  an integer round-half-even keeps the kernel memory-bound on GPUs.

A note on flush-to-zero: GPUs may flush fp32 subnormals to a sign-preserving zero in the division. That cannot
change a byte: a subnormal fp32 quotient is far below half the smallest e4m3 subnormal (2^-10) and rounds to a
zero of the same sign anyway, and a subnormal input divided by any scale >= 2^-100 is such a quotient too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from miniserve.kernels.backend import triton_interpreter_enabled
from miniserve.kernels.dependent_launch import launch_options, release_dependents, wait_for_previous
from miniserve.kernels.float_bits import DTYPE_KIND, to_f32, to_storage
from miniserve.kernels.fp8 import fp8_format, is_fp8
from miniserve.kernels.layer_ops import Rope, rotary_factors, rotate_pair


@triton.jit
def divide_rn(x, scale):
    """x / scale, IEEE-rounded (fp32). A power-of-two scale whose reciprocal is a normal float (the default scale
    1.0 among them) multiplies by that reciprocal instead: the exact quotient is then the exact product, and both
    IEEE operations round it the same way, so the bits cannot differ; a multiply is one instruction where
    `div_rn` is a dozen. The test is on the scalar scale, so every thread takes the same branch."""
    scale_bits = scale.to(tl.int32, bitcast=True)
    exponent = (scale_bits >> 23) & 0xFF
    if ((scale_bits & 0x7FFFFF) == 0) & (exponent >= 1) & (exponent <= 253):
        inverse = (((254 - exponent) << 23) | (scale_bits & -0x80000000)).to(tl.float32, bitcast=True)
        quotient = x * inverse
    else:
        quotient = tl.math.div_rn(x, scale)
    return quotient


@triton.jit
def quantize_e4m3_bits(
    x,
    scale,
    EXP_BIAS: tl.constexpr,  # 7 for e4m3fn, 8 for e4m3fnuz
    MAX_BITS: tl.constexpr,  # fp32 bit pattern of the format's max (448.0 or 240.0)
    NAN_BYTE: tl.constexpr,  # canonical NaN byte (0x7F or 0x80)
    NEG_ZERO: tl.constexpr,  # whether the format has a negative zero
):
    """fp32-convertible x -> e4m3 byte (int32 in 0..255): RNE(clamp(x / scale, -max, max)).

    Rounding uses the FPU's own round-to-nearest-even: adding a power of two M whose ulp equals the e4m3 ulp
    at the value's exponent (2^(E-3), E = max(exponent, min normal exponent)) rounds |y| to the e4m3 grid,
    and the low mantissa bits of M + |y| count e4m3 ulps, k. For normals k is 8 + mantissa (16 on a carry into
    the next binade), for subnormals k is the mantissa (8 when rounding up to the smallest normal), so the
    code is ((E + bias - 1) << 3) + k in both ranges. M + |y| never carries into M's exponent (|y| < 2^(E+1)
    while M = 2^(E+20)), and a flushed subnormal |y| still yields k = 0, its correct rounding.
    """
    bits = divide_rn(x.to(tl.float32), scale).to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    is_nan = mag > 0x7F800000
    mag = tl.minimum(mag, MAX_BITS)  # clamp (inf included) on the integer magnitude
    min_normal_bits: tl.constexpr = (128 - EXP_BIAS) << 23  # 2^(1 - bias)
    exp_bits = tl.maximum(mag & 0x7F800000, min_normal_bits)  # 2^E
    magic_bits = exp_bits + (20 << 23)  # M = 2^(E + 20): its ulp is 2^(E - 3)
    summed = mag.to(tl.float32, bitcast=True) + magic_bits.to(tl.float32, bitcast=True)
    k = summed.to(tl.int32, bitcast=True) - magic_bits
    code = ((exp_bits - min_normal_bits) >> 20) + k
    byte = code | ((bits >> 24) & 0x80)
    if not NEG_ZERO:
        byte = tl.where(code == 0, 0, byte)
    return tl.where(is_nan, NAN_BYTE, byte)


@triton.jit
def _rotate_tile(
    src_ptr,
    lo,
    mask,
    c1,
    c2,
    s1,
    s2,
    HALF_STRIDE,
    KIND: tl.constexpr,
):
    """Rotate the pairs (lo, lo + HALF_STRIDE) of q or k in place (layer_ops' arithmetic); returns the rotated
    halves as stored (bf16 as int16 bits), for the cache."""
    x1 = to_f32(tl.load(src_ptr + lo, mask=mask, other=0), KIND)
    x2 = to_f32(tl.load(src_ptr + lo + HALF_STRIDE, mask=mask, other=0), KIND)
    o1, o2 = rotate_pair(x1, x2, c1, c2, s1, s2, KIND)
    r1, r2 = to_storage(o1, KIND), to_storage(o2, KIND)
    tl.store(src_ptr + lo, r1, mask=mask)
    tl.store(src_ptr + lo + HALF_STRIDE, r2, mask=mask)
    return r1, r2


@triton.jit
def _store_tile(
    x,
    cache_ptr,
    dst_off,
    mask,
    scale,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    MAX_BITS: tl.constexpr,
    NAN_BYTE: tl.constexpr,
    NEG_ZERO: tl.constexpr,
):
    """Convert a tile of K or V elements as loaded (bf16 as int16 bits) as MODE says and scatter it into the
    cache."""
    if MODE == 3:  # same dtype: copy the bits
        y = x
    else:
        x = to_f32(x, KIND)  # exactly (bf16 from its bits: the interpreter's cast mangles subnormals)
        if MODE == 1:  # fp8 cache, viewed as uint8
            y = quantize_e4m3_bits(x, scale, EXP_BIAS, MAX_BITS, NAN_BYTE, NEG_ZERO).to(tl.uint8)
        elif MODE == 2:  # bf16 cache viewed as int16
            y = to_storage(x, 2)
        else:  # fp16 / fp32 cache: casts every backend rounds correctly
            y = x.to(cache_ptr.dtype.element_ty)
    tl.store(cache_ptr + dst_off, y, mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])  # every step's count: one compile, not one per 1 | 16k | other
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    k_scale_ptr,
    v_scale_ptr,
    q_ptr,  # ROPE: the queries, rotated in place (else unused, like the three below)
    pos_ptr,
    cos_ptr,
    sin_ptr,
    num_tokens,
    k_stride_t,
    k_stride_h,
    k_stride_d,
    v_stride_t,
    v_stride_h,
    v_stride_d,
    kc_stride_b,
    kc_stride_s,
    kc_stride_h,
    kc_stride_d,
    vc_stride_b,
    vc_stride_s,
    vc_stride_h,
    vc_stride_d,
    q_stride_t,
    q_stride_h,
    table_stride,  # cos and sin rows
    q_pairs,  # ROPE: query heads x HEAD_DIM / 2
    kv_programs,  # ROPE: the programs along axis 1 that write K/V; the ones after them rotate queries
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_X_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    KIND: tl.constexpr,  # the source dtype (float_bits.py)
    MODE: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    MAX_BITS: tl.constexpr,
    NAN_BYTE: tl.constexpr,
    NEG_ZERO: tl.constexpr,
    ROPE: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent (dependent_launch.py)
):
    """One program: BLOCK_T tokens x BLOCK_HD flattened (head, dim) elements, for K and for V. ROPE: BLOCK_HD
    (head, d < HEAD_DIM / 2) pairs instead, K rotated before its conversion (and left rotated in `key`), and the
    programs past `kv_programs` rotate the queries' pairs in place."""
    release_dependents(USE_PDL)
    wait_for_previous(USE_PDL)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        in_range = tok < num_tokens
        slot = tl.load(slot_ptr + tok, mask=in_range, other=-1)[:, None]
        pos = tl.load(pos_ptr + tok, mask=in_range, other=0)[:, None]
        tok = tok.to(tl.int64)[:, None]
        is_query = tl.program_id(1) >= kv_programs
        pair = (tl.program_id(1) - tl.where(is_query, kv_programs, 0)) * BLOCK_HD + tl.arange(0, BLOCK_HD)
        head, d = (pair // HALF)[None, :], (pair % HALF)[None, :]
        mask = in_range[:, None] & (pair < tl.where(is_query, q_pairs, HEADS_X_DIM // 2))[None, :]
        c1, c2, s1, s2 = rotary_factors(
            cos_ptr + pos * table_stride + d, sin_ptr + pos * table_stride + d, mask, HALF, KIND
        )
        if is_query:
            _rotate_tile(q_ptr, tok * q_stride_t + head * q_stride_h + d, mask, c1, c2, s1, s2, HALF, KIND)
        else:
            k_src = tok * k_stride_t + head * k_stride_h + d * k_stride_d
            k1, k2 = _rotate_tile(key_ptr, k_src, mask, c1, c2, s1, s2, HALF * k_stride_d, KIND)
            cached = mask & (slot >= 0)
            block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
            k_dst = block * kc_stride_b + offset * kc_stride_s + head * kc_stride_h + d * kc_stride_d
            v_src = tok * v_stride_t + head * v_stride_h + d * v_stride_d
            v_dst = block * vc_stride_b + offset * vc_stride_s + head * vc_stride_h + d * vc_stride_d
            k_scale, v_scale = tl.load(k_scale_ptr), tl.load(v_scale_ptr)
            k_hi, v_hi, v_src_hi = k_dst + HALF * kc_stride_d, v_dst + HALF * vc_stride_d, v_src + HALF * v_stride_d
            _store_tile(k1, key_cache_ptr, k_dst, cached, k_scale,
                        KIND, MODE, EXP_BIAS, MAX_BITS, NAN_BYTE, NEG_ZERO)  # fmt: skip
            _store_tile(k2, key_cache_ptr, k_hi, cached, k_scale,
                        KIND, MODE, EXP_BIAS, MAX_BITS, NAN_BYTE, NEG_ZERO)  # fmt: skip
            _store_tile(tl.load(value_ptr + v_src, mask=cached), value_cache_ptr, v_dst, cached, v_scale,
                        KIND, MODE, EXP_BIAS, MAX_BITS, NAN_BYTE, NEG_ZERO)  # fmt: skip
            _store_tile(tl.load(value_ptr + v_src_hi, mask=cached), value_cache_ptr, v_hi, cached, v_scale,
                        KIND, MODE, EXP_BIAS, MAX_BITS, NAN_BYTE, NEG_ZERO)  # fmt: skip
    else:
        hd = tl.program_id(1) * BLOCK_HD + tl.arange(0, BLOCK_HD)
        slot = tl.load(slot_ptr + tok, mask=tok < num_tokens, other=-1)  # int64
        head, dim = hd // HEAD_DIM, hd % HEAD_DIM
        mask = (slot >= 0)[:, None] & (hd < HEADS_X_DIM)[None, :]
        tok = tok.to(tl.int64)[:, None]
        block, offset = (slot // BLOCK_SIZE)[:, None], (slot % BLOCK_SIZE)[:, None]
        head, dim = head[None, :], dim[None, :]
        k_src = tok * k_stride_t + head * k_stride_h + dim * k_stride_d
        v_src = tok * v_stride_t + head * v_stride_h + dim * v_stride_d
        k_dst = block * kc_stride_b + offset * kc_stride_s + head * kc_stride_h + dim * kc_stride_d
        v_dst = block * vc_stride_b + offset * vc_stride_s + head * vc_stride_h + dim * vc_stride_d
        k_scale, v_scale = tl.load(k_scale_ptr), tl.load(v_scale_ptr)
        _store_tile(tl.load(key_ptr + k_src, mask=mask), key_cache_ptr, k_dst, mask, k_scale,
                    KIND, MODE, EXP_BIAS, MAX_BITS, NAN_BYTE, NEG_ZERO)  # fmt: skip
        _store_tile(tl.load(value_ptr + v_src, mask=mask), value_cache_ptr, v_dst, mask, v_scale,
                    KIND, MODE, EXP_BIAS, MAX_BITS, NAN_BYTE, NEG_ZERO)  # fmt: skip


def _bits_view(x: torch.Tensor) -> torch.Tensor:
    """bf16 and fp8 tensors travel as integers: the kernel does their conversions on the bits itself."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16)
    return x.view(torch.uint8) if is_fp8(x.dtype) else x


def _tile_shape(num_tokens: int, heads_x_dim: int, elements: int | None, pairs: bool = False) -> tuple[int, int]:
    """Elements per program: 512 for a decode step's few tokens (the FP8 cast is arithmetic-heavy, so the work is
    spread over more programs: 2.80 -> 1.85 us for 64 tokens x 8 x 64 on an H200), 2K for prompt chunks (fewer,
    fuller programs; benchmarks/results/tune_small_kernels_h200.json); one huge program in the interpreter, where
    launches dominate. Only the time changes: each element's bytes do not depend on the tiling. pairs (a rotating
    write): heads_x_dim counts (head, d < D/2) pairs, two elements each, so a tile holds half as many."""
    per_token = heads_x_dim * (2 if pairs else 1)  # elements of K a token brings
    if elements is None:
        elements = 1 << 16 if triton_interpreter_enabled() else (512 if num_tokens * per_token <= 1 << 20 else 2048)
    elements = elements // 2 if pairs else elements
    block_hd = min(triton.next_power_of_2(heads_x_dim), elements)
    block_t = min(max(1, elements // block_hd), triton.next_power_of_2(num_tokens))
    return block_t, block_hd


def _cache_consts(key: torch.Tensor, key_cache: torch.Tensor) -> dict:
    """The kernel's conversion constexprs for this source and cache dtype (KIND: the source's, float_bits.py; MODE:
    0 a plain cast to fp16/fp32, 1 FP8, 2 bf16, 3 the same dtype)."""
    consts = dict(KIND=DTYPE_KIND.get(key.dtype, 0), MODE=0, EXP_BIAS=0, MAX_BITS=0, NAN_BYTE=0, NEG_ZERO=False)
    if key_cache.dtype == key.dtype:
        consts["MODE"] = 3
    elif is_fp8(key_cache.dtype):
        fmt = fp8_format(key_cache.dtype)
        consts.update(
            MODE=1,
            EXP_BIAS=fmt.exponent_bias,
            MAX_BITS=fmt.max_fp32_bits,
            NAN_BYTE=fmt.nan_byte,
            NEG_ZERO=fmt.has_negative_zero,
        )
    elif key_cache.dtype == torch.bfloat16:
        consts["MODE"] = 2
    return consts


def reshape_and_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    tile_elements: int | None = None,
    num_warps: int = 4,
    rope: Rope | None = None,
    pdl: bool = False,
) -> None:
    """The Triton path of `miniserve.kernels.reshape_and_cache` (arguments validated there); the tile size and
    warp count are knobs for benchmarks. rope: rotate `rope.query` and `key` in place first, in the same launch;
    pdl: launch as a programmatic dependent (dependent_launch.py)."""
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if rope is not None and rope.cos.stride(0) != rope.sin.stride(0):
        raise ValueError(f"cos and sin must share a row stride, got {rope.cos.stride(0)} and {rope.sin.stride(0)}")
    width = num_heads * head_dim // (2 if rope else 1)  # elements, or (head, d < D/2) pairs when rotating
    block_t, block_hd = _tile_shape(num_tokens, width, tile_elements, pairs=rope is not None)
    kv_programs = triton.cdiv(width, block_hd)
    q = key if rope is None else rope.query
    q_pairs = 0 if rope is None else q.shape[1] * head_dim // 2
    positions, cos, sin = (slot_mapping, k_scale, k_scale) if rope is None else (rope.positions, rope.cos, rope.sin)
    grid = (triton.cdiv(num_tokens, block_t), kv_programs + triton.cdiv(q_pairs, block_hd))
    _reshape_and_cache_kernel[grid](
        _bits_view(key), _bits_view(value), _bits_view(key_cache), _bits_view(value_cache),
        slot_mapping, k_scale, v_scale, _bits_view(q), positions, cos, sin, num_tokens,
        *key.stride(), *value.stride(), *key_cache.stride(), *value_cache.stride(), *q.stride()[:2], cos.stride(0),
        q_pairs, kv_programs,
        BLOCK_SIZE=key_cache.shape[1], HEAD_DIM=head_dim, HEADS_X_DIM=num_heads * head_dim,
        BLOCK_T=block_t, BLOCK_HD=block_hd, ROPE=rope is not None, USE_PDL=pdl,
        num_warps=num_warps,
        enable_fp_fusion=False,  # the rotation's products round before their sum, as torch's do
        **_cache_consts(key, key_cache), **launch_options(pdl),
    )  # fmt: skip
