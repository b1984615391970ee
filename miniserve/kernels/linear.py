"""A decoder layer's projections: cuBLAS (`F.linear`, the reference), or at decode batch sizes on GPUs that launch
kernels as dependents (kernels/dependent_launch.py) a skinny Triton GEMM launched so.

Why: at a decode step's few rows a projection reads its whole weight once and is bound by that read, and the
small ones (Llama-3.2-1B's q/k/v and output: 8-12 MB) spend much of their time starting and draining. cuBLAS
kernels cannot be launched as programmatic dependents; this one can, so it starts while the kernel before it
finishes. Alone, at its best launch settings, it runs at 0.93-1.31x cuBLAS's speed on the real shapes (2.5x once,
where cuBLAS picks a slow kernel), the most where it splits the reduction (`tune_linear_h200.json`); in a chain
of a layer's kernels launched as dependents it is faster than cuBLAS (`pdl_chain_h200.json`).

The kernel: every program a block of rows (16 or 64) by a narrow slice of output columns over the reduction, in
BLOCK_K steps with fp32 accumulation, the bias added in fp32 before the one rounding to the output dtype. Where the
slices alone would leave SMs idle (a long reduction into few columns), the reduction is split in parts and the
last program of a tile to finish adds the parts' fp32 sums in a fixed order, in the same launch. Its outputs differ
from cuBLAS's in the last bits, as two cuBLAS kernels' do. An MLP's gate/up projection can also apply the SiLU·mul
that follows it to its tiles before storing them (`linear_silu_and_mul`): the same bits, one launch fewer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from miniserve.kernels.dependent_launch import launch_options
from miniserve.kernels.layer_ops import silu_and_mul

try:
    import triton
    import triton.language as tl

    from miniserve.kernels.dependent_launch import release_dependents, wait_for_previous
    from miniserve.kernels.float_bits import DTYPE_KIND, round_as, to_f32
    from miniserve.kernels.layer_ops import silu_times
except ImportError:  # CPU-only install: F.linear serves every call
    triton = None

SKINNY_MAX_ROWS = 64  # the launch settings were tuned up to here (the engine's DEPENDENT_MAX_TOKENS)
SKINNY_DTYPES = (torch.float16, torch.bfloat16)  # fp32 would need tl.dot's IEEE mode to match F.linear's precision
TILE_COUNTERS = 1 << 16  # split-K output tiles a launch may have (a weight of up to a million columns)
SkinnyConfig = tuple[int, int, int, int, int, int]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, pdl: bool = False):
    """`F.linear(x, weight, bias)`. pdl (set only where `dependent_launch_supported`): at up to SKINNY_MAX_ROWS
    rows of a 16-bit dtype, the skinny Triton GEMM launched as a programmatic dependent instead of cuBLAS."""
    fits = pdl and _skinny_fits(x, weight)
    config = skinny_config(*x.shape, weight.shape[0], *device_limits(x.device)) if fits else None
    if config is None:
        return F.linear(x, weight, bias)
    return skinny_linear(x, weight, bias, config, pdl=True)


@functools.cache
def device_limits(device: torch.device) -> tuple[int, int]:
    """(shared memory the GEMM's pipelined tiles may take, SM count) on `device`: a block's opt-in maximum (227 KiB
    on Hopper) less 27 KiB for what Triton keeps for itself; 132 SMs on an H100/H200."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 227 << 10) - (27 << 10), props.multi_processor_count


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto", pdl: bool = False):
    """`silu_and_mul(F.linear(x, weight))` for an MLP's stacked [gate; up] weight [2I, K] -> [M, I]. pdl (as
    `linear`'s): where the skinny GEMM fits, one launch that applies SiLU(gate) * up to its tiles before storing
    them (`gate_up_config`), the same bits as the GEMM then layer_ops' kernel: one launch a layer fewer, and the
    [M, 2I] product is never written. Elsewhere the two calls."""
    fits = pdl and _skinny_fits(x, weight) and weight.shape[0] % 2 == 0
    config = gate_up_config(*x.shape, weight.shape[0] // 2, device_limits(x.device)[0]) if fits else None
    if config is None:
        return silu_and_mul(linear(x, weight, pdl=pdl), backend, pdl)
    return skinny_linear(x, weight, None, config, pdl=True, silu_mul=True)


def _skinny_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    shapes_fit = x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS and x.stride(1) == 1 and weight.stride(1) == 1
    return shapes_fit and x.dtype in SKINNY_DTYPES and weight.dtype == x.dtype


def skinny_config(m: int, k: int, n: int, smem_bytes: int = 200 << 10, sms: int = 132) -> SkinnyConfig | None:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K) for an [m, k] x [n, k]^T product, or None when
    no BLOCK_K of 16..512 divides k. From `tune_linear_h200.json` (Llama-3.2-1B, Llama-3.1-8B, Qwen3-0.6B shapes):
    - up to 16 rows: narrow 16-column slices with long 512-wide steps, except wide weights (gate/up), which have
      programs enough with 64 columns;
    - more rows: 64-row blocks with 256-wide steps, the slices wider as the weight is, or as the reduction is long
      (every slice reads the rows' whole 64 x k block);
    - split in two halves where the weight has fewer 16-column slices than the GPU has SMs (`sms`) and each half
      still takes 3 of the 512-wide steps: Llama-3.2-1B's and Qwen3-0.6B's down projections. It depends on the
      weight only, never on m, so that a row's bits never depend on the rows beside it.
    The pipeline holds at most `smem_bytes` of tiles (Hopper has 227 KiB a block)."""
    wide, split = n >= 12288, 2 if -(-n // 16) < sms and k >= 2 * 3 * 512 else 1
    if m <= 16:
        block_m, (block_n, block_k, warps, stages) = 16, (64, 128, 4, 3) if wide else (16, 512, 2, 3)
    else:
        block_m, block_n = 64, 64 if n >= 6144 else 32 if n >= 3072 or k >= 8192 else 16
        block_k, warps, stages = (128, 4, 3) if wide else (256, 4, 3) if block_n == 64 else (256, 4, 4)
    block_k = _k_step(k, block_k, split)
    stages = _stages(stages, (block_m + block_n) * block_k, smem_bytes)
    return None if k % (block_k * split) else (block_m, block_n, block_k, warps, stages, split)


def gate_up_config(m: int, k: int, inter: int, smem_bytes: int = 200 << 10) -> SkinnyConfig | None:
    """The fused gate/up launch (`linear_silu_and_mul`): a program sums 32 gate and 32 up columns over 128-wide K
    steps, with 4 warps, on blocks of 16 rows (up to 16) or 64; 5 stages deep for narrow weights (Qwen3-0.6B's
    2 x 3072), 3 for wide ones (12288 stacked columns and up). The best of the sweep at every measured row count
    but Llama-3.1-8B's up to 16 rows (1.02x slower than 128-column slices; `tune_linear_gate_up_h200.json`).
    Never split: gate/up weights have columns enough. None when no step of 16..128 divides k."""
    block_k = _k_step(k, 128)
    if k % block_k:
        return None
    block_m = 16 if m <= 16 else 64
    stages = _stages(3 if 2 * inter >= 12288 else 5, (block_m + 2 * 32) * block_k, smem_bytes)
    return block_m, 32, block_k, 4, stages, 1


def _k_step(k: int, step: int, parts: int = 1) -> int:
    """`step` halved until `parts` of them divide k or it reaches 16 (then they may not: the caller checks)."""
    while step > 16 and k % (step * parts):
        step //= 2
    return step


def _stages(wanted: int, elements: int, smem_bytes: int) -> int:
    """Pipeline stages of `elements` 16-bit values each (the x and weight tiles of one K step) that fit."""
    return min(wanted, max(1, smem_bytes // (2 * elements)))


@functools.cache
def _tile_counters(device: torch.device) -> torch.Tensor:
    """Arrival counters of split-K tiles, one per output tile, zero between launches (the last program of a tile
    resets its own). Shared by every launch on the device, which is safe because the engine runs its passes on one
    stream, one kernel after another. Made by the first launch, in the engine a warm-up before graph capture."""
    return torch.zeros(TILE_COUNTERS, dtype=torch.int32, device=device)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
    pdl: bool = False,
    release_early: bool = False,
    silu_mul: bool = False,
) -> torch.Tensor:
    """x [M, K] (unit column stride) @ weight[N, K].T (+ bias [N]) -> a new contiguous [M, N] in x's dtype.
    config: skinny_config's tuple (benchmarks pass their own); pdl: launch as a programmatic dependent.
    silu_mul: weight is [gate; up] (N = 2I), the result SiLU(gate) * up [M, I] (no bias, no split; config:
    gate_up_config's)."""
    m, k = x.shape
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    config = config or (gate_up_config(m, k, n) if silu_mul else skinny_config(m, k, n))
    block_m, block_n, block_k, warps, stages, split = config
    if k % (block_k * split) or weight.shape[1] != k or x.stride(1) != 1 or weight.stride(1) != 1:
        shapes = f"{tuple(x.shape)} {tuple(weight.shape)}"
        raise ValueError(f"needs K % {block_k * split} == 0 and unit column strides, got {shapes}")
    if silu_mul and (bias is not None or split > 1 or weight.shape[0] % 2):
        raise ValueError(f"SiLU-and-mul needs an even row count, no bias and no split, got {tuple(weight.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    partials = out  # unread when unsplit
    if split > 1:
        tiles = grid[0] * grid[1]
        if tiles > TILE_COUNTERS:
            raise ValueError(f"split-K over {tiles} output tiles, more than {TILE_COUNTERS}")
        partials = torch.empty(tiles * split * block_m * block_n, dtype=torch.float32, device=x.device)
    _skinny_linear_kernel[grid](
        x, weight, weight if bias is None else bias, out, partials, _tile_counters(x.device), m, n, k, x.stride(0),
        weight.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
        HAS_BIAS=bias is not None, USE_PDL=pdl, RELEASE_EARLY=release_early, SILU_AND_MUL=silu_mul,
        KIND=DTYPE_KIND[x.dtype], num_warps=warps, num_stages=stages, **launch_options(pdl),
        **({"enable_fp_fusion": False} if silu_mul else {}),  # layer_ops' SiLU kernel is compiled so
    )  # fmt: skip
    return out


if triton is not None:
    # M is specialized (M == 1, M % 16 == 0, other: three compiles) on purpose: it makes a chain of Llama-3.2-1B's
    # GEMMs 5% faster at 1 and 16 rows, and CUDA-graph capture (buckets 1, 2, 4, 8, 16, 24, ...) compiles them first
    @triton.jit
    def _skinny_linear_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        partials_ptr,
        counters_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        USE_PDL: tl.constexpr,
        RELEASE_EARLY: tl.constexpr = False,  # benchmarks/pdl_chain.py's comparison: release before the loop
        SILU_AND_MUL: tl.constexpr = False,
        KIND: tl.constexpr = 1,  # the dtype (float_bits.DTYPE_KIND), for SILU_AND_MUL's roundings
    ):
        """One program: BLOCK_M rows x BLOCK_N output columns over K / SPLIT_K of the reduction (the program_id(2)-th
        part). With SPLIT_K > 1 every part stores its fp32 sums, and the tile's last program to arrive adds them in
        part order (the same bits whichever arrives last) and rounds once. SILU_AND_MUL: the program also sums the
        up columns N + its columns, rounds both tiles to the dtype, as a GEMM stores them, and stores SiLU(gate) * up
        rounded as layer_ops' `_silu_and_mul_kernel` computes it."""
        if RELEASE_EARLY:
            release_dependents(USE_PDL)
        wait_for_previous(USE_PDL)
        tile_n, tile_m, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = part * (K // SPLIT_K) + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
        w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
        row_ok = (rows < M)[:, None]
        col_ok = (cols < N)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SILU_AND_MUL:
            up_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            up_ptrs = w_ptr + (N + cols)[None, :].to(tl.int64) * stride_wn + ks[:, None]
        for _ in range(0, K // SPLIT_K, BLOCK_K):
            x = tl.load(x_ptrs, mask=row_ok, other=0.0)
            w = tl.load(w_ptrs, mask=col_ok, other=0.0)
            acc = tl.dot(x, w, acc)
            if SILU_AND_MUL:
                up_acc = tl.dot(x, tl.load(up_ptrs, mask=col_ok, other=0.0), up_acc)
                up_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if not RELEASE_EARLY:
            release_dependents(USE_PDL)  # only the stores are left: the next kernel may start
        last = True
        if SPLIT_K > 1:
            tile = tile_m * tl.num_programs(0) + tile_n
            in_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            tile_partials = partials_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N) + in_tile
            tl.store(tile_partials + part * (BLOCK_M * BLOCK_N), acc, cache_modifier=".cg")
            tl.debug_barrier()  # every thread's sums are stored before the tile's counter says so
            last = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
            if last:
                acc = tl.load(tile_partials, cache_modifier=".cg")
                for p in tl.static_range(1, SPLIT_K):
                    acc += tl.load(tile_partials + p * (BLOCK_M * BLOCK_N), cache_modifier=".cg")
                tl.atomic_xchg(counters_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
        if last:
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            if SILU_AND_MUL:
                acc = _silu_and_mul_of_sums(acc, up_acc, out_ptr.dtype.element_ty, KIND)
            out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok & col_ok)

    @triton.jit
    def _silu_and_mul_of_sums(gate_sums, up_sums, DTYPE: tl.constexpr, KIND: tl.constexpr):
        """fp32 sums -> SiLU(gate) * up rounded to DTYPE (returned in fp32, exact in DTYPE), bit for bit what
        storing both as DTYPE and running layer_ops' `_silu_and_mul_kernel` on them gives: each sum rounded by the
        same cast as the GEMM's store, read back as that kernel reads it (bf16 on its bits), its `silu_times`."""
        if KIND == 2:
            gate = to_f32(gate_sums.to(DTYPE).to(tl.int16, bitcast=True), KIND)
            up = to_f32(up_sums.to(DTYPE).to(tl.int16, bitcast=True), KIND)
        else:
            gate = gate_sums.to(DTYPE).to(tl.float32)
            up = up_sums.to(DTYPE).to(tl.float32)
        return round_as(silu_times(gate, up, KIND), KIND)
