"""The FP8 KV-cache quantization semantic, defined once.

Every KV write path (the Triton kernel, the torch reference, the CPU engine) must produce the bytes that
`quantize_fp8_reference` produces:

    q = RNE(clamp(x_fp32 / scale, -max, +max))

with an IEEE fp32 division, round-to-nearest-even into the FP8 format, and these pinned corner cases (so the
bytes do not depend on torch's own, version-dependent overflow and NaN behaviour):

* NaN stays NaN and is canonical: every NaN becomes 0x7F (e4m3fn) or 0x80 (e4m3fnuz, its only NaN);
* +-inf and anything beyond the format's range saturate to +-max (clamp comes before the cast);
* e4m3fn keeps the sign of zero (-0.0 -> 0x80); e4m3fnuz has no negative zero, so every zero is 0x00.

Two formats are supported: float8_e4m3fn (OCP, max 448, NVIDIA and MI350) and float8_e4m3fnuz (max 240,
MI300 / gfx94x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fp8Format:
    """Bit-level facts about one e4m3 format; the Triton kernels take these as constexprs."""

    dtype: torch.dtype
    max_value: float
    exponent_bias: int  # 7 for e4m3fn, 8 for e4m3fnuz
    nan_byte: int  # the canonical NaN encoding we store
    has_negative_zero: bool

    @property
    def max_fp32_bits(self) -> int:
        """Bit pattern of +max as an fp32: integer order equals float order for non-negative floats."""
        return int(torch.tensor([self.max_value], dtype=torch.float32).view(torch.int32).item())


FP8_FORMATS = {
    torch.float8_e4m3fn: Fp8Format(torch.float8_e4m3fn, 448.0, 7, 0x7F, True),
    torch.float8_e4m3fnuz: Fp8Format(torch.float8_e4m3fnuz, 240.0, 8, 0x80, False),
}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_FORMATS


def fp8_format(dtype: torch.dtype) -> Fp8Format:
    if dtype not in FP8_FORMATS:
        raise ValueError(f"not an FP8 KV-cache dtype: {dtype}; expected one of {list(FP8_FORMATS)}")
    return FP8_FORMATS[dtype]


def fp8_max(dtype: torch.dtype) -> float:
    return fp8_format(dtype).max_value


def quantize_fp8_reference(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (any float dtype) -> FP8 `dtype` with the pinned semantic above; `scale`: fp32 tensor of shape [1].

    Torch's fp32 division is IEEE and its in-range fp32->fp8 cast is round-to-nearest-even; everything torch
    versions disagree on (overflow, NaN sign, the fnuz zero) is clamped away or pinned explicitly.
    """
    fmt = fp8_format(dtype)
    y = x.to(torch.float32) / scale.to(device=x.device, dtype=torch.float32)
    nan = torch.isnan(y)
    y = y.clamp(-fmt.max_value, fmt.max_value)
    q = y.to(dtype).view(torch.uint8)
    if not fmt.has_negative_zero:
        q = torch.where(q == 0x80, torch.zeros_like(q), q)  # -0.0 (not NaN: NaN is handled next)
    q = torch.where(nan, torch.full_like(q, fmt.nan_byte), q)
    return q.view(dtype)


def dequantize_fp8_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 -> fp32 value times scale. The fp8 -> fp32 cast is exact, so only the product rounds."""
    return q.to(torch.float32) * scale.to(device=q.device, dtype=torch.float32)
