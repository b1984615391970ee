"""Fused KV write: one Triton launch scales, quantizes and scatters K and V of every new token into its page.

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
from miniserve.kernels.fp8 import fp8_format, is_fp8

_FP32_EXP_BIAS = 127


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
def round_to_bf16_bits(x):
    """fp32-convertible x -> bf16 bit pattern (int32), round to nearest even, NaN -> 0x7FC0 (torch's choice).

    Done on the bits because the interpreter's own fp32 -> bf16 cast truncates."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    rounded = ((mag + 0x7FFF + ((mag >> 16) & 1)) >> 16) | ((bits >> 16) & 0x8000)
    return tl.where(mag > 0x7F800000, 0x7FC0, rounded)


@triton.jit
def _store_tile(
    src_ptr,
    cache_ptr,
    src_off,
    dst_off,
    mask,
    scale,
    SRC_BF16: tl.constexpr,
    MODE: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    MAX_BITS: tl.constexpr,
    NAN_BYTE: tl.constexpr,
    NEG_ZERO: tl.constexpr,
):
    """Load one tile of K or V, convert it as MODE says and scatter it into the cache."""
    x = tl.load(src_ptr + src_off, mask=mask)
    if MODE == 3:  # same dtype: copy the bits
        y = x
    else:
        if SRC_BF16:  # bf16 bits (int16 view) -> fp32, exactly (the interpreter's cast mangles subnormals)
            x = (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        if MODE == 1:  # fp8 cache, viewed as uint8
            y = quantize_e4m3_bits(x, scale, EXP_BIAS, MAX_BITS, NAN_BYTE, NEG_ZERO).to(tl.uint8)
        elif MODE == 2:  # bf16 cache viewed as int16
            y = round_to_bf16_bits(x).to(tl.int16)
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
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_X_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    SRC_BF16: tl.constexpr,
    MODE: tl.constexpr,
    EXP_BIAS: tl.constexpr,
    MAX_BITS: tl.constexpr,
    NAN_BYTE: tl.constexpr,
    NEG_ZERO: tl.constexpr,
):
    """One program: BLOCK_T tokens x BLOCK_HD flattened (head, dim) elements, for K and for V."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
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
    k_scale = tl.load(k_scale_ptr)
    v_scale = tl.load(v_scale_ptr)
    _store_tile(
        key_ptr,
        key_cache_ptr,
        k_src,
        k_dst,
        mask,
        k_scale,
        SRC_BF16,
        MODE,
        EXP_BIAS,
        MAX_BITS,
        NAN_BYTE,
        NEG_ZERO,
    )
    _store_tile(
        value_ptr,
        value_cache_ptr,
        v_src,
        v_dst,
        mask,
        v_scale,
        SRC_BF16,
        MODE,
        EXP_BIAS,
        MAX_BITS,
        NAN_BYTE,
        NEG_ZERO,
    )


def _bits_view(x: torch.Tensor) -> torch.Tensor:
    """bf16 and fp8 tensors travel as integers: the kernel does their conversions on the bits itself."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16)
    return x.view(torch.uint8) if is_fp8(x.dtype) else x


def _tile_shape(num_tokens: int, heads_x_dim: int, elements: int | None) -> tuple[int, int]:
    """Elements per program: 512 for a decode step's few tokens (the FP8 cast is arithmetic-heavy, so the work is
    spread over more programs: 2.80 -> 1.85 us for 64 tokens x 8 x 64 on an H200), 2K for prompt chunks (fewer,
    fuller programs; benchmarks/results/tune_small_kernels_h200.json); one huge program in the interpreter, where
    launches dominate. Only the time changes: each element's bytes do not depend on the tiling."""
    if elements is None:
        elements = 1 << 16 if triton_interpreter_enabled() else (512 if num_tokens * heads_x_dim <= 1 << 20 else 2048)
    block_hd = min(triton.next_power_of_2(heads_x_dim), elements)
    block_t = min(max(1, elements // block_hd), triton.next_power_of_2(num_tokens))
    return block_t, block_hd


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
) -> None:
    """The Triton path of `miniserve.kernels.reshape_and_cache` (arguments validated there); the tile size and
    warp count are knobs for benchmarks."""
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    consts = dict(SRC_BF16=key.dtype == torch.bfloat16, MODE=0, EXP_BIAS=0, MAX_BITS=0, NAN_BYTE=0, NEG_ZERO=False)
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
    key, value = _bits_view(key), _bits_view(value)
    key_cache, value_cache = _bits_view(key_cache), _bits_view(value_cache)
    block_t, block_hd = _tile_shape(num_tokens, num_heads * head_dim, tile_elements)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_heads * head_dim, block_hd))
    _reshape_and_cache_kernel[grid](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        k_scale,
        v_scale,
        num_tokens,
        *key.stride(),
        *value.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        BLOCK_SIZE=key_cache.shape[1],
        HEAD_DIM=head_dim,
        HEADS_X_DIM=num_heads * head_dim,
        BLOCK_T=block_t,
        BLOCK_HD=block_hd,
        num_warps=num_warps,
        **consts,
    )
