"""Every GPU check and benchmark of miniserve.kernels in one process (one device session):

1. the CPU test files under this box's torch/triton (interpreter), in a background subprocess;
2. bit-exactness of the fused KV write on the GPU: all 65,536 bf16 and fp16 bit patterns x 5 scales x both
   FP8 formats against the independent oracle (tests/fp8_oracle.py, on the CPU), plus the plain
   bf16/fp16/fp32 stores;
3. the attention kernels' FP8 page decode (hardware e4m3fn conversion and bit-field decode) of all 256 codes,
   NaN codes included, which the interpreter cannot emulate (tests/README.md lists what only the GPU checks);
   decode and extend attention kernels against the torch reference on the GPU;
4. benchmarks: KV write (fused vs two-launch, copy ceiling) and decode attention (tuning sweep, bandwidth,
   vs SDPA).
Writes kernels.json and kernels.md to $OUT (default: benchmarks/results) and prints a short table last.
Usage: PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kernels.py
       python3 benchmarks/gpu_kernels.py --checks cache_write_exact fp8_page_decode attention_vs_reference --out F
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
from bench_decode_attention import bench_decode, nominal_peak_gbs, tune_decode  # noqa: E402
from bench_kv_write import bench_kv_write, copy_bandwidth_gbs, import_kernels, tune_kv_write  # noqa: E402
from fp8_oracle import all_code_values, quantize_bytes  # noqa: E402
from provenance import write_result  # noqa: E402

kernels = import_kernels()
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from miniserve.kernels import decode_attention as page_decode  # noqa: E402

DEADLINE_S = float(os.environ.get("GPU_KERNELS_DEADLINE_S", 380))
START = time.time()

FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
# tests/test_fp8_cache_write.py's scales, and its power-of-two edges (a multiply from 2^-126 to 2^126, else a division)
SCALES = (1.0, 0.37, 3.0, 1e-3, 1e3, 2.0**-126, 2.0**-127, 2.0**126, 2.0**127, 0.25)


def all_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def start_cpu_tests() -> subprocess.Popen:
    """The interpreter test files, importing only miniserve.kernels (a stub package dir on PYTHONPATH)."""
    stub = Path(tempfile.mkdtemp()) / "miniserve"
    stub.mkdir()
    (stub / "__init__.py").write_text("")
    (stub / "kernels").symlink_to(ROOT / "miniserve" / "kernels")
    tests = [str(ROOT / "tests" / f) for f in ("test_fp8_cache_write.py", "test_attention_kernels.py")]
    env = {**os.environ, "PYTHONPATH": str(stub.parent), "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.Popen(cmd, cwd=stub.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_cache_write_exact(device) -> list[dict]:
    """Fused-write bytes vs the FP8 oracle for every 16-bit input (40 combos), and plain stores."""
    rows = []
    slots = torch.randperm(512, generator=torch.Generator().manual_seed(7))
    for src in (torch.bfloat16, torch.float16):
        x = all_bit_patterns(src)
        key, value = x.view(512, 1, 128).to(device), x.flip(0).reshape(512, 1, 128).to(device)
        for fp8 in FP8:
            for scale in SCALES:
                s = torch.tensor([scale], device=device)
                kc = torch.zeros(32, 16, 1, 128, dtype=torch.uint8, device=device).view(fp8)
                vc = torch.zeros_like(kc)
                kernels.reshape_and_cache(key, value, kc, vc, slots.to(device), s, s, backend="triton")
                want = torch.from_numpy(quantize_bytes(x, scale, fp8))
                got_k = kc.view(torch.uint8).reshape(512, 128)[slots].reshape(-1).cpu()
                got_v = vc.view(torch.uint8).reshape(512, 128)[slots].reshape(-1).cpu()
                bad = int((got_k != want).sum()) + int((got_v != want.flip(0)).sum())
                rows.append(dict(src=str(src)[6:], cache=str(fp8)[6:], scale=scale, mismatches=bad))
        for dst in (torch.bfloat16, torch.float16, torch.float32):
            kc = torch.zeros(32, 16, 1, 128, dtype=dst, device=device)
            vc = torch.zeros_like(kc)
            one = torch.ones(1, device=device)
            kernels.reshape_and_cache(key, value, kc, vc, slots.to(device), one, one, backend="triton")
            got = kc.reshape(512, 128)[slots].reshape(-1).cpu()
            want = x.to(dst)
            as_int = {2: torch.int16, 4: torch.int32}[want.element_size()]
            same = (got.view(as_int) == want.view(as_int)) | (torch.isnan(got) & torch.isnan(want))
            rows.append(dict(src=str(src)[6:], cache=str(dst)[6:], scale=None, mismatches=int((~same).sum())))
    return rows


def check_rope_write_exact(device) -> list[dict]:
    """The rotating KV write (`reshape_and_cache(rope=...)`, the layers' one launch for RoPE and the write) against
    the torch path (apply_rotary_reference_, then reshape_and_cache_reference) on the GPU: q, k and both pages bit
    for bit, at decode and prompt-chunk token counts, Llama-3.2-1B's and Llama-3.1-8B's heads, 0.37 / 1.0 scales."""
    from miniserve.kernels.layer_ops import Rope

    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for src, cache, (tokens, hq, hk, d) in itertools.product(
        (torch.bfloat16, torch.float16, torch.float32),
        (torch.float8_e4m3fn, torch.bfloat16),
        ((1, 32, 8, 64), (64, 32, 8, 64), (257, 32, 8, 128)),
    ):
        qkv = (torch.randn(tokens, hq + 2 * hk, d, device=device, generator=g) * 4).to(src)
        positions = torch.randint(0, 4096, (tokens,), device=device, generator=g)
        inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
        freqs = torch.arange(4096, device=device).float()[:, None] * inv[None]
        cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
        slots = torch.randperm(4 * tokens + 16, device=device, generator=g)[:tokens]
        ks, vs = torch.tensor([0.37], device=device), torch.tensor([1.0], device=device)
        got = []
        for impl in ("triton", "torch"):
            x = qkv.clone()
            kc = torch.zeros(-(-(4 * tokens + 16) // 16), 16, hk, d * cache.itemsize, dtype=torch.uint8, device=device)
            kc, vc = kc.view(cache), kc.clone().view(cache)
            q, k, v = x[:, :hq], x[:, hq : hq + hk], x[:, hq + hk :]
            kernels.reshape_and_cache(k, v, kc, vc, slots, ks, vs, impl, Rope(q, positions, cos, sin))
            got.append((x.view(torch.uint8), kc.view(torch.uint8), vc.view(torch.uint8)))
        (x_t, kc_t, vc_t), (x_r, kc_r, vc_r) = got
        rows.append(dict(src=str(src)[6:], cache=str(cache)[6:], tokens=tokens, head_dim=d,
                         qk_bits_equal=torch.equal(x_t, x_r),
                         mismatches=int((kc_t != kc_r).sum()) + int((vc_t != vc_r).sum())))  # fmt: skip
    return rows


def check_skinny_linear(device) -> list[dict]:
    """The decode projections' Triton GEMM (kernels/linear.py) in bf16 at real shapes and decode row counts: its
    error against an fp64 product in units of the allowed one (half a bf16 ulp of the exact value plus fp32
    accumulation; <= 1 passes) beside cuBLAS's; launched as a programmatic dependent = launched plainly, bit for
    bit; and whether a row's bits depend on how many rows came with it (cuBLAS's do)."""
    from miniserve.kernels.linear import skinny_linear

    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    shapes = {"llama-1b qkv": (3072, 2048), "llama-1b gate_up": (16384, 2048), "llama-1b down": (2048, 8192),
              "llama-8b o": (4096, 4096), "llama-8b down": (4096, 14336), "qwen3-0.6b qkv": (4096, 1024),
              "qwen3-0.6b o": (1024, 2048)}  # fmt: skip
    for (name, (n, k)), m in itertools.product(shapes.items(), (1, 7, 16, 17, 64)):
        x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
        w = (torch.randn(n, k, device=device, generator=g) * 0.02).to(torch.bfloat16)
        exact = x.double() @ w.double().T
        bound = 2**-8 * exact.abs() + 2**-20 * (x.double().abs() @ w.double().abs().T) + 1e-30
        plain, dependent = skinny_linear(x, w), skinny_linear(x, w, pdl=True)
        first = skinny_linear(x[:1], w)
        rows.append(dict(shape=name, m=m, err_over_bound=((plain.double() - exact).abs() / bound).max().item(),
                         cublas_err_over_bound=((F.linear(x, w).double() - exact).abs() / bound).max().item(),
                         dependent_bits_equal=torch.equal(plain, dependent),
                         row0_equals_m1=torch.equal(plain[:1], first),
                         cublas_row0_equals_m1=torch.equal(F.linear(x, w)[:1], F.linear(x[:1], w))))  # fmt: skip
    return rows


def check_gate_up_silu(device) -> list[dict]:
    """The MLP's gate/up GEMM with SiLU(gate) * up in its epilogue (`linear_silu_and_mul`'s one launch) in bf16 at
    the real shapes and decode row counts, bit for bit against what it replaces: the skinny GEMM of the stacked
    weight (its own config, the same launch kind) then layer_ops' SiLU kernel; launched as a dependent and
    plainly; a row's bits without the rows beside it."""
    from miniserve.kernels.layer_ops import silu_and_mul
    from miniserve.kernels.linear import skinny_linear

    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    shapes = {"llama-1b": (8192, 2048), "llama-8b": (14336, 4096), "qwen3-0.6b": (3072, 1024)}
    for (name, (inter, k)), m in itertools.product(shapes.items(), (1, 7, 16, 17, 64)):
        x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
        w = (torch.randn(2 * inter, k, device=device, generator=g) * 0.02).to(torch.bfloat16)
        two = [silu_and_mul(skinny_linear(x, w, pdl=pdl), pdl=pdl) for pdl in (False, True)]
        fused = [skinny_linear(x, w, pdl=pdl, silu_mul=True) for pdl in (False, True)]
        rows.append(dict(shape=name, m=m, plain_equal=torch.equal(fused[0], two[0]),
                         dependent_equal=torch.equal(fused[1], two[1]),
                         row0_equals_m1=torch.equal(fused[0][:1], skinny_linear(x[:1], w, silu_mul=True)),
                         finite=bool(fused[0].isfinite().all())))  # fmt: skip
    return rows


@triton.jit
def _decode_codes_kernel(codes_ptr, out_ptr, KV_MODE: tl.constexpr, NAN_ALL_ONES: tl.constexpr):
    offs = tl.arange(0, 256)
    # STAGED (the V-tile conversion of KV_FP8_HW_STAGED, inline PTX) as decode_attention passes it: a constexpr
    # expression in the call (bound to a local name first, Triton 3.6 treats it as a runtime value)
    x = page_decode.load_kv_tile(codes_ptr, offs, offs < 256, KV_MODE, NAN_ALL_ONES, tl.float32, KV_MODE == 3)
    tl.store(out_ptr + offs, x)


def check_fp8_page_decode(device) -> list[dict]:
    """All 256 codes through the attention kernels' tile load, in each FP8 decode mode, vs the code values."""
    rows = []
    codes = torch.arange(256, dtype=torch.int32, device=device).to(torch.uint8)
    for fp8 in FP8:
        for fp8_decode in ("auto", "bits", "hw-staged") if fp8 == torch.float8_e4m3fn else ("auto", "bits"):
            mode, nan_all_ones, factor = page_decode.kv_mode(fp8, device, fp8_decode)
            out = torch.empty(256, dtype=torch.float32, device=device)
            _decode_codes_kernel[(1,)](codes, out, mode, nan_all_ones)
            got = torch.from_numpy(out.cpu().double().numpy() * factor)
            want = torch.from_numpy(all_code_values(fp8))
            bad = int((~((got == want) | (got.isnan() & want.isnan()))).sum())
            rows.append(dict(cache=str(fp8)[6:], fp8_decode=fp8_decode, kv_mode=mode, mismatches=bad))
    return rows


@triton.jit
def _decode_words_kernel(words_ptr, lo_ptr, hi_ptr):
    offs = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    lo, hi = page_decode.e4m3x2_to_fp16_pair(tl.load(words_ptr + offs))
    tl.store(lo_ptr + offs, lo)
    tl.store(hi_ptr + offs, hi)


def check_fp8_pair_decode(device) -> list[dict]:
    """All 65,536 int16 words through the byte-pair conversion of the default FP8 V read (KV_FP8_HW_PAIRS): the
    low byte must give the first value, the high byte the second, each its e4m3fn code's value (NaN for NaN)."""
    words = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32, device=device).to(torch.int16)
    lo, hi = (torch.empty(1 << 16, dtype=torch.float16, device=device) for _ in range(2))
    _decode_words_kernel[(64,)](words, lo, hi)
    codes = words.view(torch.uint8).view(-1, 2)  # little-endian: [:, 0] the low byte
    want = torch.from_numpy(all_code_values(torch.float8_e4m3fn)).to(device)[codes.long()]
    got = torch.stack((lo, hi), dim=1).double()
    bad = ~((got == want) | (got.isnan() & want.isnan()))
    return [dict(words=1 << 16, mismatching_low=int(bad[:, 0].sum()), mismatching_high=int(bad[:, 1].sum()))]


def attention_batch(device, seqs, block_size, q_heads, kv_heads, head_dim, cache_dtype, q_dtype, seed=0, k_mult=1.0):
    """Sequences [(seq_len, q_len)] with shuffled pages, written through the fused kernel. `k_mult` scales K and its
    cache scale together: the same FP8 codes, K's values (and so the logits) that much smaller."""
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = [-(-s // block_size) for s, _ in seqs]
    num_blocks = sum(blocks) + 2
    pool = torch.randperm(num_blocks, device=device, generator=g)
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32, device=device)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    kc = torch.zeros(shape, dtype=torch.uint8 if kernels.is_fp8(cache_dtype) else cache_dtype, device=device)
    kc = kc.view(cache_dtype)
    vc = torch.zeros_like(kc)
    ks, vs = torch.tensor([0.05 * k_mult], device=device), torch.tensor([0.02], device=device)
    used = 0
    for i, (seq_len, _) in enumerate(seqs):
        tables[i, : blocks[i]] = pool[used : used + blocks[i]].int()
        used += blocks[i]
        pos = torch.arange(seq_len, device=device)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        k = torch.randn(seq_len, kv_heads, head_dim, device=device, generator=g) * (2 * k_mult)
        v = torch.randn(seq_len, kv_heads, head_dim, device=device, generator=g)
        kernels.reshape_and_cache(k.to(q_dtype), v.to(q_dtype), kc, vc, slots, ks, vs, backend="triton")
    q_lens = [ql for _, ql in seqs]
    q = torch.randn(sum(q_lens), q_heads, head_dim, device=device, generator=g).to(q_dtype)
    meta = kernels.AttentionMetadata(
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0, *q_lens], device=device).cumsum(0).int(),
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=device),
        block_tables=tables,
        max_query_len=max(q_lens),
        max_seq_len=max(s for s, _ in seqs),
    )
    return q, kc, vc, meta, ks, vs


def check_attention(device) -> list[dict]:
    from miniserve.kernels.decode_attention import decode_attention
    from miniserve.kernels.extend_attention import extend_attention

    decode = [(1, 1), (17, 1), (300, 1), (2048, 1), (4099, 1)]
    extend = [(5, 5), (300, 37), (1000, 1), (2048, 512), (77, 5)]
    e4m3fn, fnuz, bf16, fp16, fp32 = (
        torch.float8_e4m3fn,
        torch.float8_e4m3fnuz,
        torch.bfloat16,
        torch.float16,
        torch.float32,
    )
    cases = [  # (block_size, q heads, kv heads, head_dim, cache, q dtype, fp8_decode, q multiplier)
        (16, 32, 8, 128, e4m3fn, bf16, "auto", 1.0),
        # |q| > fp16 max: the fp16 dot must rescale q (K and its scale shrink by as much, so the logits stay the
        # size of the other cases': logits near 1e5 would carry fp32 rounding of ~0.01 into near-tied softmax weights)
        (16, 32, 8, 128, e4m3fn, bf16, "auto", 3e5),
        (16, 32, 8, 128, e4m3fn, bf16, "bits", 1.0),
        (16, 32, 8, 128, e4m3fn, bf16, "hw-staged", 1.0),
        (16, 32, 8, 64, e4m3fn, bf16, "hw-staged", 3e5),
        (16, 32, 8, 128, fnuz, bf16, "auto", 1.0),
        (16, 32, 8, 128, bf16, bf16, "auto", 1.0),
        (16, 16, 16, 64, e4m3fn, fp16, "auto", 1.0),
        (1, 8, 2, 80, e4m3fn, bf16, "auto", 1.0),
        (32, 16, 4, 256, bf16, bf16, "auto", 1.0),
        (16, 8, 4, 64, fp32, fp32, "auto", 1.0),
    ]
    rows = []
    for block_size, hq, hkv, d, cache, qd, fp8_decode, q_mult in cases:
        for kind, seqs in (("decode", decode), ("extend", extend)):
            if kind == "extend" and fp8_decode == "bits":
                continue
            q, kc, vc, meta, ks, vs = attention_batch(
                device, seqs, block_size, hq, hkv, d, cache, qd, k_mult=1 / q_mult
            )
            q = (q.float() * q_mult).to(qd)
            sm = 1 / math.sqrt(d)
            want = kernels.paged_attention(q, kc, vc, meta, ks, vs, sm, backend="torch").float()
            if kind == "decode":
                got = decode_attention(q, kc, vc, meta, ks, vs, sm, fp8_decode=fp8_decode).float()
            elif fp8_decode != "auto":
                got = extend_attention(q, kc, vc, meta, ks, vs, sm, fp8_decode=fp8_decode).float()
            else:
                got = kernels.paged_attention(q, kc, vc, meta, ks, vs, sm, backend="triton").float()
            tol = 1e-4 if qd == fp32 else 2e-2
            err = (got - want).abs().max().item()
            ok = bool(torch.allclose(got, want, atol=tol, rtol=tol))
            extra = {}
            if fp8_decode == "hw-staged" and kind == "extend":  # same tiles, same conversion: the bits of "auto"
                same = torch.equal(got, extend_attention(q, kc, vc, meta, ks, vs, sm).float())
                extra["identical_to_auto"] = bool(same)
                ok = ok and same  # (decode's "auto" reads V in byte pairs: other MMA packing, an ulp apart)
            rows.append(
                dict(kind=kind, block_size=block_size, q_heads=hq, kv_heads=hkv, head_dim=d,
                     cache=str(cache)[6:], q=str(qd)[6:], q_mult=q_mult, fp8_decode=fp8_decode, max_abs_err=err,
                     ok=ok, **extra)
            )  # fmt: skip
            if kind == "decode" and fp8_decode == "auto":  # the split sizes decode_splits="by-batch" picks
                for split_tokens in (64, 128, 1024):
                    got = decode_attention(q, kc, vc, meta, ks, vs, sm, split_tokens=split_tokens).float()
                    rows.append({**rows[-1], "kind": f"decode, {split_tokens}-token splits",
                                 "max_abs_err": (got - want).abs().max().item(),
                                 "ok": bool(torch.allclose(got, want, atol=tol, rtol=tol))})  # fmt: skip
    return rows


def check_decode_vs_extend(device) -> list[dict]:
    """A query decoded alone (decode kernel, one split: contexts up to 512) and as a one-token prompt chunk (extend
    kernel in its 64-row query tiles, wgmma on Hopper, and in 16-row ones, mma.sync as in decode) against each
    other: what a decode token gets in a mixed step (run whole on the extend kernel) against a decode step. Per
    cache and FP8 read: how many outputs differ. 256 sequences of 1..512 cached tokens."""
    from miniserve.kernels.decode_attention import decode_attention
    from miniserve.kernels.extend_attention import extend_attention

    g = torch.Generator().manual_seed(1)
    seqs = [(int(n), 1) for n in torch.randint(1, 513, (256,), generator=g)]
    e4m3fn, bf16 = torch.float8_e4m3fn, torch.bfloat16
    cases = [(32, 8, 128, bf16, "auto"), (32, 8, 64, bf16, "auto"), (16, 8, 128, bf16, "auto")]
    cases += [(hq, hkv, d, e4m3fn, mode) for hq, hkv, d, _, _ in cases for mode in ("auto", "hw", "hw-staged")]
    rows = []
    for hq, hkv, d, cache, mode in cases:
        q, kc, vc, meta, ks, vs = attention_batch(device, seqs, 16, hq, hkv, d, cache, bf16)
        sm = 1 / math.sqrt(d)
        dec = decode_attention(q, kc, vc, meta, ks, vs, sm, fp8_decode=mode)
        for block_m in (64, 16):
            ext = extend_attention(q, kc, vc, meta, ks, vs, sm, fp8_decode=mode, block_m=block_m)
            rows.append(
                dict(q_heads=hq, kv_heads=hkv, head_dim=d, cache=str(cache)[6:], fp8_decode=mode,
                     extend_block_m=block_m, decode_equals_extend=bool(torch.equal(dec, ext)),
                     differing=int((dec != ext).sum()), of=dec.numel(),
                     max_abs_diff=(dec.float() - ext.float()).abs().max().item())
            )  # fmt: skip
            print(rows[-1], flush=True)
    return rows + verify_timing(device)


def verify_timing(device) -> list[dict]:
    """The extend kernel on a speculative verification's shape (64 sequences x 5 new tokens over ~600 cached
    ones, Llama-3.2-1B and -3.1-8B heads) in 64-row and in 16-row query tiles: microseconds each."""
    from miniserve.kernels.extend_attention import extend_attention

    g = torch.Generator().manual_seed(2)
    seqs = [(int(n), 5) for n in torch.randint(500, 700, (64,), generator=g)]
    rows = []
    for hq, hkv, d in ((32, 8, 64), (32, 8, 128)):
        for cache in (torch.bfloat16, torch.float8_e4m3fn):
            q, kc, vc, meta, ks, vs = attention_batch(device, seqs, 16, hq, hkv, d, cache, torch.bfloat16)
            row = dict(shape=f"{hq}/{hkv}x{d}", cache=str(cache)[6:], seqs=len(seqs), new_tokens=5)
            args = (q, kc, vc, meta, ks, vs, d**-0.5)
            for block_m in (64, 16):
                fn = functools.partial(extend_attention, *args, block_m=block_m)
                row[f"us_block_m_{block_m}"] = 1e3 * triton.testing.do_bench(fn, warmup=20, rep=200)
            rows.append(row)
            print(row, flush=True)
    return rows


def check_extend_variants(device, extend=None, cases=None) -> list[dict]:
    """Every tune_extend_attention.EXTEND_VARIANTS entry against the torch reference on ragged prompts with and
    without cached prefixes, at four head sizes, GQA groups, block sizes and cache dtypes; and whether each
    gives bit-identical results to the default extend kernel (the same tiles in the same order should: which
    variants do is what the GPU decides). A variant the GPU cannot run at a shape (out of shared memory or
    registers) is recorded with its error and ok None."""
    from benchmarks.tune_extend_attention import EXTEND_VARIANTS
    from miniserve.kernels.extend_attention import extend_attention

    extend = extend or [(5, 5), (300, 37), (1000, 1), (2048, 512), (77, 5), (700, 700), (3000, 1300)]
    cases = cases or [  # (block_size, q heads, kv heads, head_dim, cache, q dtype); each compiles every variant
        (16, 16, 8, 128, torch.bfloat16, torch.bfloat16),  # Qwen3-0.6B heads
        (16, 32, 8, 128, torch.float8_e4m3fn, torch.bfloat16),  # Llama-3.1-8B heads, FP8
        (1, 12, 4, 80, torch.float8_e4m3fn, torch.float16),  # group 3 (padded to 4 rows), head_dim padded
        (32, 8, 4, 64, torch.float32, torch.float32),
    ]
    rows = []
    for block_size, hq, hkv, d, cache, qd in cases:
        q, kc, vc, meta, ks, vs = attention_batch(device, extend, block_size, hq, hkv, d, cache, qd)
        sm = 1 / math.sqrt(d)
        want = kernels.paged_attention(q, kc, vc, meta, ks, vs, sm, backend="torch").float()
        default = extend_attention(q, kc, vc, meta, ks, vs, sm)
        tol = 1e-4 if qd == torch.float32 else 2e-2
        for name, kw in EXTEND_VARIANTS.items():
            row = dict(variant=name, block_size=block_size, q_heads=hq, kv_heads=hkv, head_dim=d,
                       cache=str(cache)[6:], q=str(qd)[6:])  # fmt: skip
            try:
                got = extend_attention(q, kc, vc, meta, ks, vs, sm, **kw)
            except Exception as e:  # noqa: BLE001 - a variant out of resources at this shape
                rows.append(dict(row, ok=None, error=f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            err = (got.float() - want).abs().max().item()
            rows.append(dict(row, max_abs_err=err, ok=bool(torch.allclose(got.float(), want, atol=tol, rtol=tol)),
                             identical_to_default=bool(torch.equal(got, default))))  # fmt: skip
    return rows


def section(results: dict, name: str, fn, *args):
    """Run one section; record its rows or its error, and never run past the deadline."""
    if time.time() - START > DEADLINE_S:
        results[name] = {"skipped": "deadline"}
        print(f"== {name}: skipped (deadline)")
        return
    t0 = time.time()
    print(f"== {name} ...", flush=True)
    try:
        results[name] = fn(*args)
    except Exception:  # noqa: BLE001 - report and go on with the other sections
        results[name] = {"error": traceback.format_exc()}
        print(results[name]["error"])
    print(f"== {name}: {time.time() - t0:.1f} s", flush=True)


def to_markdown(results: dict) -> str:
    lines = [f"# miniserve.kernels on {results['gpu']}", ""]
    for k in ("command", "torch", "triton", "copy_bandwidth_gbs", "nominal_peak_gbs", "cpu_tests"):
        lines.append(f"- {k}: `{results.get(k)}`")
    for name, rows in results.items():
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            for r in rows:
                cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
                lines.append("| " + " | ".join(cells) + " |")
        elif isinstance(rows, dict) and ("error" in rows or "skipped" in rows):
            lines += ["", f"## {name}", "", "```", str(rows.get("error") or rows.get("skipped")), "```"]
    return "\n".join(lines) + "\n"


def summary(results: dict) -> list[str]:
    out = []
    exact = results.get("cache_write_exact")
    if isinstance(exact, list):
        bad = sum(r["mismatches"] for r in exact)
        out.append(f"exactness: {len(exact)} combos, {bad} mismatching bytes")
    rope = results.get("rope_write_exact")
    if isinstance(rope, list):
        bad = sum(r["mismatches"] for r in rope) + sum(not r["qk_bits_equal"] for r in rope)
        out.append(f"rotating write: {len(rope)} combos, {bad} mismatching (q/k tensors, cache bytes)")
    lin = results.get("skinny_linear")
    if isinstance(lin, list):
        out.append(f"skinny GEMM: {sum(r['err_over_bound'] <= 1 for r in lin)}/{len(lin)} within bound, dependent = "
                   f"plain bits in {sum(r['dependent_bits_equal'] for r in lin)}/{len(lin)}")  # fmt: skip
    fused = results.get("gate_up_silu")
    if isinstance(fused, list):
        same = sum(r["plain_equal"] and r["dependent_equal"] for r in fused)
        out.append(f"gate/up + SiLU in one launch: the two launches' bits in {same}/{len(fused)}, a row's bits "
                   f"alone in {sum(r['row0_equals_m1'] for r in fused)}/{len(fused)}")  # fmt: skip
    decode = results.get("fp8_page_decode")
    if isinstance(decode, list):
        out.append(f"fp8 page decode: {len(decode)} modes, {sum(r['mismatches'] for r in decode)} mismatching codes")
    pairs = results.get("fp8_pair_decode")
    if isinstance(pairs, list):
        out.append(f"fp8 pair decode: {pairs[0]['mismatching_low'] + pairs[0]['mismatching_high']} mismatching of "
                   f"{2 * pairs[0]['words']} bytes")  # fmt: skip
    att = results.get("attention_vs_reference")
    if isinstance(att, list):
        out.append(f"attention vs reference: {sum(r['ok'] for r in att)}/{len(att)} ok")
    ext = results.get("extend_variants")
    if isinstance(ext, list):
        ran = [r for r in ext if r["ok"] is not None]
        same = sum(r["identical_to_default"] for r in ran)
        out.append(
            f"extend variants vs reference: {sum(r['ok'] for r in ran)}/{len(ran)} ok, {same} bit-identical to "
            f"the default, {len(ext) - len(ran)} could not run"
        )
    ceiling = results.get("copy_bandwidth_gbs")
    for r in results.get("kv_write", []) if isinstance(results.get("kv_write"), list) else []:
        out.append(
            f"kv_write T={r['tokens']:>5}: fused {r['fused_us']:7.2f} us, x{r['speedup']:.2f} vs two-launch "
            f"(eager x{r['eager_speedup']:.2f}), {r['fused_gbs']:6.0f} GB/s "
            f"= {r['fused_gbs'] / ceiling:.0%} of copy"
        )
    peak = results.get("nominal_peak_gbs") or ceiling
    dec = results.get("decode") if isinstance(results.get("decode"), list) else []
    by_key = {(r["cache"], r["batch"], r["context"]): r for r in dec if "us" in r}
    for (cache, b, c), r in by_key.items():
        bf = by_key.get(("bfloat16", b, c))
        ratio = f" fp8/bf16 speedup x{bf['us'] / r['us']:.2f}" if cache != "bfloat16" and bf else ""
        sdpa = f" sdpa {r['sdpa_us']:8.1f} us" if "sdpa_us" in r else ""
        out.append(
            f"decode {cache:>13} bs{b:<3} ctx{c:<5}: {r['us']:8.1f} us {r['gbs']:6.0f} GB/s "
            f"({r['gbs'] / peak:.0%} of peak){sdpa}{ratio}"
        )
    out.append(f"cpu tests: {results.get('cpu_tests')}")
    return out


CHECKS = {
    "cache_write_exact": check_cache_write_exact,
    "rope_write_exact": check_rope_write_exact,
    "skinny_linear": check_skinny_linear,
    "gate_up_silu": check_gate_up_silu,
    "fp8_page_decode": check_fp8_page_decode,
    "fp8_pair_decode": check_fp8_pair_decode,
    "attention_vs_reference": check_attention,
    "extend_variants": check_extend_variants,
    "decode_vs_extend": check_decode_vs_extend,
}


def header(device: torch.device) -> dict:
    results = dict(
        gpu=torch.cuda.get_device_name(device),
        torch=torch.__version__,
        triton=triton.__version__,
        command="PYTHONUNBUFFERED=1 python3 " + " ".join(sys.argv),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    print({k: results[k] for k in ("gpu", "torch", "triton", "command")}, flush=True)
    return results


def run_checks(names: list[str], out: str) -> None:
    """Only the named correctness sections (no benchmarks, no CPU tests), into `out`: what h200_suite.sh runs."""
    device = torch.device("cuda")
    results = header(device)
    for name in names:
        section(results, name, CHECKS[name], device)
    write_result(out, results)
    print("\n".join(summary(results)))


def main() -> None:
    if "--checks" in sys.argv:  # --checks NAME... --out FILE
        args = sys.argv[sys.argv.index("--checks") + 1 :]
        names = args[: args.index("--out")]
        unknown = [n for n in names if n not in CHECKS]
        if unknown or not names:
            sys.exit(f"--checks takes some of {list(CHECKS)}, got {names}")
        return run_checks(names, args[args.index("--out") + 1])
    device = torch.device("cuda")
    results = header(device)
    results["nominal_peak_gbs"] = nominal_peak_gbs(results["gpu"])
    cpu_tests = start_cpu_tests()
    section(results, "cache_write_exact", check_cache_write_exact, device)
    section(results, "fp8_page_decode", check_fp8_page_decode, device)
    section(results, "attention_vs_reference", check_attention, device)
    results["copy_bandwidth_gbs"] = copy_bandwidth_gbs(device)
    section(results, "kv_write", bench_kv_write, device)
    section(results, "kv_write_tuning", tune_kv_write, device)
    section(results, "decode", bench_decode, device)
    section(results, "decode_tuning", tune_decode, device)
    try:
        log, _ = cpu_tests.communicate(timeout=max(10, DEADLINE_S + 30 - (time.time() - START)))
        results["cpu_tests"] = log.strip().splitlines()[-1] if log.strip() else "no output"
        results["cpu_tests_log_tail"] = log[-3000:]
    except subprocess.TimeoutExpired:
        cpu_tests.kill()
        results["cpu_tests"] = "timed out"
    out_dir = Path(os.environ.get("OUT") or HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_result(out_dir / "kernels.json", results)
    (out_dir / "kernels.md").write_text(to_markdown(results))
    print("\n".join(["", "==== summary ====", *summary(results)]))


if __name__ == "__main__":
    main()
