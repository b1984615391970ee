"""An FP8 oracle that shares nothing with miniserve/kernels/fp8.py: the formats' facts are restated here from
the OCP FP8 and the AMD fnuz specifications, every code is decoded arithmetically, and a value is quantized by a
table search over the codes (nearest, ties to the even code), in numpy.

    q = RNE(clamp(x_fp32 / scale, -max, +max)), IEEE fp32 division; NaN -> the canonical NaN byte;
    e4m3fn keeps the sign of zero, e4m3fnuz has a single zero (0x00) and its only NaN is 0x80.
"""

from __future__ import annotations

import numpy as np
import torch

# (exponent bias, max, canonical NaN byte, has -0) per format, from the specifications
FORMATS = {
    torch.float8_e4m3fn: (7, 448.0, 0x7F, True),
    torch.float8_e4m3fnuz: (8, 240.0, 0x80, False),
}


def code_values(dtype: torch.dtype) -> np.ndarray:
    """fp64 value of the non-negative codes 0..127, from the bit layout s.eeee.mmm (NaN = nan)."""
    bias = FORMATS[dtype][0]
    codes = np.arange(128)
    e, m = codes >> 3, codes & 7
    vals = np.where(e == 0, m / 8.0 * 2.0 ** (1 - bias), (1 + m / 8.0) * 2.0 ** (e - bias))
    if dtype == torch.float8_e4m3fn:
        vals[0x7F] = np.nan  # e4m3fn: S.1111.111 is NaN; e4m3fnuz: NaN is the negative zero 0x80
    return vals


def all_code_values(dtype: torch.dtype) -> np.ndarray:
    """fp64 value of all 256 codes (NaN where the code is NaN)."""
    vals = code_values(dtype)
    both = np.concatenate([vals, -vals])
    if not FORMATS[dtype][3]:
        both[0x80] = np.nan
    return both


def quantize_bytes(x: torch.Tensor, scale: float, dtype: torch.dtype) -> np.ndarray:
    """The uint8 codes of `x` (any float dtype) quantized with `scale`."""
    _, max_value, nan_byte, has_negative_zero = FORMATS[dtype]
    with np.errstate(invalid="ignore", over="ignore"):
        y = x.detach().cpu().float().numpy() / np.float32(scale)  # numpy fp32 division is IEEE
    assert y.dtype == np.float32
    vals = code_values(dtype)
    finite_codes = np.arange(128)[~np.isnan(vals)]  # ascending in value
    table = vals[finite_codes]
    a = np.minimum(np.abs(y.astype(np.float64)), max_value)  # clamp first
    hi = np.clip(np.searchsorted(table, a), 0, len(table) - 1)
    lo = np.clip(hi - 1, 0, len(table) - 1)
    d_lo, d_hi = a - table[lo], table[hi] - a  # exact: both are fp64 differences of short-mantissa values
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (finite_codes[hi] % 2 == 0))
    code = np.where(pick_hi, finite_codes[hi], finite_codes[lo]).astype(np.uint8)
    negative = np.signbit(y)
    if has_negative_zero:
        code = np.where(negative, code | 0x80, code)
    else:
        code = np.where(negative & (code != 0), code | 0x80, code)
    return np.where(np.isnan(y), nan_byte, code).astype(np.uint8).reshape(y.shape)


def quantize_bytes_tensor(x: torch.Tensor, scale: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`quantize_bytes` as a uint8 torch tensor of x's shape."""
    return torch.from_numpy(quantize_bytes(x, float(scale), dtype))
