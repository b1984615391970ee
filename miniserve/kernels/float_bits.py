"""Exact roundings between fp32 and the tensor dtypes, on the bits, shared by the Triton kernels.

Why on the bits: the CPU interpreter's own fp32 -> bf16 cast truncates and its bf16 -> fp32 cast flushes
subnormals, so kernels that must match torch bit for bit on every backend (the layer ops, the KV write) carry
bf16 as int16 and convert it here. `KIND` names the dtype: 0 fp32, 1 fp16, 2 bf16 (as int16 bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPE_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the kernels' `KIND` constexpr


@triton.jit
def round_to_bf16_bits(x):
    """fp32-convertible x -> bf16 bit pattern (int32), round to nearest even, NaN -> 0x7FC0 (torch's choice)."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    rounded = ((mag + 0x7FFF + ((mag >> 16) & 1)) >> 16) | ((bits >> 16) & 0x8000)
    return tl.where(mag > 0x7F800000, 0x7FC0, rounded)


@triton.jit
def to_f32(x, KIND: tl.constexpr):
    """A loaded element -> fp32, exactly (KIND 2: bf16 as int16 bits)."""
    if KIND == 2:
        y = (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def round_as(x, KIND: tl.constexpr):
    """fp32 x rounded to the tensor dtype (round to nearest even) and widened back: torch's per-op rounding."""
    if KIND == 2:
        y = (round_to_bf16_bits(x) << 16).to(tl.float32, bitcast=True)
    elif KIND == 1:
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y


@triton.jit
def to_storage(x, KIND: tl.constexpr):
    """fp32 x rounded to the tensor dtype, as stored (KIND 2: int16 bits)."""
    if KIND == 2:
        y = round_to_bf16_bits(x).to(tl.int16)
    elif KIND == 1:
        y = x.to(tl.float16)
    else:
        y = x
    return y
