"""Fused elementwise ops of a Llama decoder layer: RMSNorm (+ residual add), RoPE, SiLU-and-mul.

Why: a decode step of a small model under CUDA graphs is bound by kernel count, and the torch versions of these
ops launch one kernel per elementwise op (RMSNorm alone is ~8). Each op here is one Triton launch, and RoPE none
of its own: its arithmetic (`rotary_factors`, `rotate_pair`) runs inside the KV write (`Rope`, cache_write.py).

Each op has a pure-torch reference (`*_reference`, the exact arithmetic of models/llama.py, used on CPU and as
the test oracle) and a Triton kernel that rounds every intermediate to the tensor dtype exactly where torch does:

* rotary and the residual sum are bit-identical to torch (fp32, bf16, fp16). fp32 needs the launch option
  `enable_fp_fusion=False`, else a*b+c is contracted into one FMA with a single rounding;
* rms_norm and silu_and_mul differ from torch only through the row reduction order, rsqrt and exp (hardware
  approximations on GPUs): the rounded intermediate can be one ulp off, the output two (tests allow two);
* a NaN result is a NaN, its payload is not matched (torch's own differs between its CPU paths and CUDA).

bf16 tensors travel as int16 bits and are converted on the bits (kernels/float_bits.py), because the
CPU interpreter's bf16 casts truncate and flush subnormals; on GPUs the integer ops cost nothing measurable.

Triton is imported when this module is, guarded so CPU-only installs (no Triton) still run the references. The
interpreter is chosen when the kernels are decorated, i.e. TRITON_INTERPRET=1 must be set before this module is
imported (tests set it first); `backend="triton"` says so if it was set too late.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miniserve.kernels.backend import triton_interpreter_enabled, use_triton
from miniserve.kernels.dependent_launch import launch_options

try:
    import triton
    import triton.language as tl

    from miniserve.kernels.dependent_launch import release_dependents, wait_for_previous
    from miniserve.kernels.float_bits import DTYPE_KIND, round_as, to_f32, to_storage
except ImportError:  # CPU-only install: the references serve every call
    triton = None

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Rope:
    """Rotary embeddings for a KV write to apply on its way (`reshape_and_cache(..., rope=Rope(...))`, the one
    launch a layer runs for both): `query` [T, Hq, D] is rotated in place beside the keys (views into a packed qkv
    are fine: last dim contiguous). positions: int64 [T]. cos, sin: fp32 [max_positions, D] with
    cos[p] = cat(cos(p*f), cos(p*f)) (the `Rotary.cos` / `Rotary.sin` buffers). Bit-identical to
    `apply_rotary_reference_`; positions are not range-checked on the Triton path (that would need a host sync)."""

    query: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# References: the arithmetic of models/llama.py, op for op (every op rounds to the dtype, as torch does).
# ----------------------------------------------------------------------------------------------------------------


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """transformers' RMSNorm order: normalise in fp32, cast back, then scale; with `residual`, norm of the sum."""
    summed = x if residual is None else x + residual
    dtype = summed.dtype
    h = summed.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if residual is None else (out, summed)


def qk_rms_norm_reference(qk: torch.Tensor, weight: torch.Tensor, num_q_heads: int, eps: float) -> torch.Tensor:
    """Qwen3's q_norm and k_norm on the q and k heads of qk [T, Hq + Hkv, D]: weight[0] for q's, weight[1] for k's."""
    q = rms_norm_reference(qk[:, :num_q_heads], weight[0], eps)
    return torch.cat([q, rms_norm_reference(qk[:, num_q_heads:], weight[1], eps)], dim=1)


def rotary_tables_reference(
    positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 1, D] cos and signed sin cat(-sin1, sin2) in `dtype`: rotate_half(x) * sin == x.roll(D/2) * signed."""
    half = sin.shape[-1] // 2
    c, s = cos[positions], sin[positions]
    s = torch.cat((-s[:, :half], s[:, half:]), dim=-1)
    return c.unsqueeze(1).to(dtype), s.unsqueeze(1).to(dtype)


def apply_rotary_reference_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """In place: x = x * cos + x.roll(D/2) * signed_sin for q and k."""
    c, s = rotary_tables_reference(positions, cos, sin, q.dtype)
    for x in (q, k):
        x.copy_(x * c + x.roll(x.shape[-1] // 2, dims=-1) * s)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate, up stacked) -> silu(gate) * up."""
    gate, up = x.split(x.shape[-1] // 2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
    pdl: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [T, H] (or [T, N, H], e.g. Qwen3's per-head q/k norm), last dim contiguous, any other strides.

    residual None: returns RMSNorm(x). residual given (x's shape and dtype): s = x + residual, rounded like
    torch's add; returns (RMSNorm(s), s), so a layer does `h, resid = rms_norm(attn_out, w, eps, resid)`.
    Outputs are new contiguous tensors. weight: [H], x's dtype. pdl: launch the kernel as a programmatic dependent
    (kernels/dependent_launch.py; only where `dependent_launch_supported`).
    """
    _check_rms_norm_args(x, weight, residual)
    if not _triton_here(x.device, backend):
        return rms_norm_reference(x, weight, eps, residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = None if residual is None else torch.empty_like(out)
    if out.numel():
        _rms_norm_triton(x, weight, float(eps), residual, out, summed, pdl)
    return out if residual is None else (out, summed)


def qk_rms_norm(
    qk: torch.Tensor, weight: torch.Tensor, num_q_heads: int, eps: float, backend: str = "auto", pdl: bool = False
) -> torch.Tensor:
    """Qwen3's per-head q_norm and k_norm in one launch: RMSNorm of each head of qk [T, Hq + Hkv, D] (q's heads, then
    k's: a view of the packed qkv projection), with weight[0] on the first `num_q_heads` heads and weight[1] on the
    rest. Returns a new contiguous [T, Hq + Hkv, D]. The same kernel and per-row arithmetic as `rms_norm`, so the
    same bits as two rms_norm calls, one launch a layer fewer."""
    if weight.dim() != 2 or weight.shape[0] != 2:
        raise ValueError(f"weight must be [2, head_dim] (q's norm, then k's), got shape {tuple(weight.shape)}")
    if qk.dim() != 3 or not 0 < num_q_heads < qk.shape[1]:
        raise ValueError(f"qk must be [num_tokens, q heads + k heads, head_dim] with {num_q_heads} q heads first, "
                         f"got shape {tuple(qk.shape)}")  # fmt: skip
    _check_rms_norm_args(qk, weight[0], None)
    if not _triton_here(qk.device, backend):
        return qk_rms_norm_reference(qk, weight, num_q_heads, eps)
    out = torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
    if out.numel():
        _rms_norm_triton(qk, weight, float(eps), None, out, None, pdl, second_weight_from=num_q_heads)
    return out


def silu_and_mul(x: torch.Tensor, backend: str = "auto", pdl: bool = False) -> torch.Tensor:
    """x [T, 2I] (gate then up, as `MLP.gate_up_weight` stacks them; last dim contiguous) -> silu(gate) * up
    as a new contiguous [T, I] tensor. pdl: as rms_norm's."""
    _check_silu_args(x)
    if not _triton_here(x.device, backend):
        return silu_and_mul_reference(x)
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
    if out.numel():
        _silu_and_mul_triton(x, out, pdl)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Argument checks (shapes, dtypes, devices only: nothing here reads device memory)
# ----------------------------------------------------------------------------------------------------------------


def _triton_here(device: torch.device, backend: str) -> bool:
    """use_triton, plus the one way these kernels can be unusable on the CPU: decorated before the interpreter
    was switched on."""
    if not use_triton(device, backend):
        return False
    if device.type != "cuda" and type(_rms_norm_kernel).__name__ != "InterpretedFunction":
        raise ValueError(
            "backend='triton' on the CPU: TRITON_INTERPRET=1 was set after miniserve.kernels.layer_ops was "
            "imported; set it before importing miniserve"
        )
    return True


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name} dtype must be float32, float16 or bfloat16, got {t.dtype}")


def _check_rms_norm_args(x, weight, residual) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [num_tokens, hidden] or [num_tokens, heads, dim], got shape {tuple(x.shape)}")
    _check_dtype("x", x)
    if x.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dim, got strides {x.stride()}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({x.shape[-1]},) (x's last dim)")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must match x's dtype/device {x.dtype}/{x.device}, got {weight.dtype}/{weight.device}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"residual must match x's dtype/device {x.dtype}/{x.device}, got {residual.dtype}/{residual.device}"
            )
        if residual.stride(-1) != 1:
            raise ValueError(f"residual must have a contiguous last dim, got strides {residual.stride()}")


def check_rotary_args(q, k, positions, cos, sin) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"q and k must be [num_tokens, heads, head_dim], got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    _check_dtype("q", q)
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k dtype/device {k.dtype}/{k.device} != q dtype/device {q.dtype}/{q.device}")
    head_dim = q.shape[2]
    if k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"q and k need the same even head_dim, got {head_dim} and {k.shape[2]}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"q and k must have a contiguous last dim, got strides {q.stride()} and {k.stride()}")
    if positions.dtype != torch.int64 or positions.shape != (q.shape[0],) or k.shape[0] != q.shape[0]:
        raise ValueError(
            f"positions must be int64 [num_tokens] with q, k of num_tokens rows; got positions "
            f"{positions.dtype} {tuple(positions.shape)}, q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != head_dim:
            raise ValueError(
                f"{name} must be an fp32 [max_positions, {head_dim}] table, got {table.dtype} {tuple(table.shape)}"
            )
        if table.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {table.stride()}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos shape {tuple(cos.shape)} != sin shape {tuple(sin.shape)}")
    if any(t.device != q.device for t in (positions, cos, sin)):
        raise ValueError(f"positions, cos and sin must be on q's device {q.device}")


def _check_silu_args(x) -> None:
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [num_tokens, 2 * intermediate] (gate, up), got shape {tuple(x.shape)}")
    _check_dtype("x", x)
    if x.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dim, got strides {x.stride()}")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


def _bits_view(x: torch.Tensor) -> torch.Tensor:
    """bf16 travels as int16: the kernels convert it on the bits (see the module docstring)."""
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        sum_ptr,
        x_stride0,
        x_stride1,
        r_stride0,
        r_stride1,
        rows_per_group,  # x.shape[1] for [T, N, H] inputs, else 1
        second_weight_from,  # the first of a group's rows that take the weight's second row (qk_rms_norm)
        hidden,
        eps,
        BLOCK: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        KIND: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """One program per row: [s = x + residual; store s;] out = weight * (s * rsqrt(mean(s^2) + eps))."""
        release_dependents(USE_PDL)
        wait_for_previous(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        outer, inner = row // rows_per_group, row % rows_per_group
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = to_f32(tl.load(x_ptr + outer * x_stride0 + inner * x_stride1 + cols, mask=mask, other=0), KIND)
        if HAS_RESIDUAL:
            r_off = outer * r_stride0 + inner * r_stride1 + cols
            x = round_as(x + to_f32(tl.load(res_ptr + r_off, mask=mask, other=0), KIND), KIND)
            tl.store(sum_ptr + row * hidden + cols, to_storage(x, KIND), mask=mask)
        mean_sq = tl.sum(x * x, axis=0) / hidden
        y = round_as(x * tl.rsqrt(mean_sq + eps), KIND)
        w_row = (inner >= second_weight_from).to(tl.int64) * hidden
        w = to_f32(tl.load(w_ptr + w_row + cols, mask=mask, other=0), KIND)
        tl.store(out_ptr + row * hidden + cols, to_storage(w * y, KIND), mask=mask)

    @triton.jit
    def rotary_factors(cos_ptrs, sin_ptrs, mask, HALF: tl.constexpr, KIND: tl.constexpr):
        """(c1, c2, s1, s2) for the pairs (d, d + HALF) whose cos[pos, d] and sin[pos, d] the pointers address,
        rounded to the dtype as torch's tables are: c1 = cos[d], c2 = cos[d + HALF], s1 = -sin[d],
        s2 = sin[d + HALF] (rotate_half's sign)."""
        c1 = round_as(tl.load(cos_ptrs, mask=mask, other=0.0), KIND)
        c2 = round_as(tl.load(cos_ptrs + HALF, mask=mask, other=0.0), KIND)
        s1 = round_as(-tl.load(sin_ptrs, mask=mask, other=0.0), KIND)
        s2 = round_as(tl.load(sin_ptrs + HALF, mask=mask, other=0.0), KIND)
        return c1, c2, s1, s2

    @triton.jit
    def rotate_pair(x1, x2, c1, c2, s1, s2, KIND: tl.constexpr):
        """The rotation of the elements (d, d + D/2), fp32 in and out: x1' = x1*c1 + x2*s1, x2' = x2*c2 + x1*s2,
        each product rounded to the dtype in torch's order (the sum rounds where it is stored). The KV write
        rotates q and k with it on their way to the cache (cache_write.py)."""
        o1 = round_as(x1 * c1, KIND) + round_as(x2 * s1, KIND)
        o2 = round_as(x2 * c2, KIND) + round_as(x1 * s2, KIND)
        return o1, o2

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr,
        out_ptr,
        x_stride,
        inter,
        BLOCK: tl.constexpr,
        KIND: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """Program (row, block): out = r(r(silu(gate)) * up), silu in fp32 as torch computes it."""
        release_dependents(USE_PDL)
        wait_for_previous(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = to_f32(tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0), KIND)
        up = to_f32(tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0), KIND)
        tl.store(out_ptr + row * inter + cols, to_storage(silu_times(gate, up, KIND), KIND), mask=mask)

    @triton.jit
    def silu_times(gate, up, KIND: tl.constexpr):
        """r(silu(gate)) * up in fp32 (the caller rounds it once more), from the dtype's values: torch's SiLU·mul,
        shared with kernels/linear.py's gate/up epilogue so that both give the same bits."""
        return round_as(gate / (1.0 + tl.exp(-gate)), KIND) * up


def _rms_norm_triton(x, weight, eps, residual, out, summed, pdl: bool, second_weight_from: int | None = None) -> None:
    hidden = x.shape[-1]
    rows_per_group = x.shape[1] if x.dim() == 3 else 1
    second_weight_from = rows_per_group if second_weight_from is None else second_weight_from  # None: one weight
    x_strides = (x.stride(0), x.stride(1) if x.dim() == 3 else 0)
    r_strides = (0, 0) if residual is None else (residual.stride(0), residual.stride(1) if x.dim() == 3 else 0)
    block = triton.next_power_of_2(hidden)
    num_rows = x.numel() // hidden
    _rms_norm_kernel[(num_rows,)](
        _bits_view(x),
        _bits_view(x if residual is None else residual),
        _bits_view(weight.contiguous()),
        _bits_view(out),
        _bits_view(out if summed is None else summed),
        *x_strides,
        *r_strides,
        rows_per_group,
        second_weight_from,
        hidden,
        eps,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        KIND=DTYPE_KIND[x.dtype],
        USE_PDL=pdl,
        num_warps=_num_warps(block),
        enable_fp_fusion=False,
        **launch_options(pdl),
    )


def _silu_and_mul_triton(x, out, pdl: bool) -> None:
    inter = out.shape[1]
    block = min(triton.next_power_of_2(inter), 4096 if triton_interpreter_enabled() else 1024)
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](
        _bits_view(x),
        _bits_view(out),
        x.stride(0),
        inter,
        BLOCK=block,
        KIND=DTYPE_KIND[x.dtype],
        USE_PDL=pdl,
        num_warps=_num_warps(block),
        enable_fp_fusion=False,
        **launch_options(pdl),
    )
