"""The GPU's kernel configuration, run in Triton's CPU interpreter where it can be.

Under TRITON_INTERPRET=1 the launchers pick interpreter-friendly settings: KV tiles of 16 positions and query
tiles of 16 (GPU: 64 / 128 for FP8 caches, and 64), one 65,536-element program for the KV write (GPU: ~2K per
program), SiLU*mul columns of 4096 (GPU: 1024), the bit-field FP8 decode (GPU, e4m3fn on NVIDIA:
KV_FP8_HW_PAIRS, the hardware fp8 -> fp16 conversion with V read in byte pairs) and fp32 dots for bf16 (GPU: bf16
dots). The tests below force the GPU's choice of each, except the bf16 dot, and compare with the torch references
and the independent FP8 oracle.

What the interpreter cannot run, and which GPU script covers it instead: tests/README.md.
"""

import functools
import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fp8_oracle import all_code_values, quantize_bytes  # noqa: E402
from test_attention_kernels import DECODE_SEQS, EXTEND_SEQS, make_batch, tolerance  # noqa: E402

import miniserve.kernels.decode_attention as decode_module  # noqa: E402
import miniserve.kernels.extend_attention as extend_module  # noqa: E402
import miniserve.kernels.layer_ops as layer_ops  # noqa: E402
from benchmarks import gpu_kernels  # noqa: E402
from benchmarks.tune_decode_attention import FP8_VARIANTS  # noqa: E402
from benchmarks.tune_extend_attention import EXTEND_VARIANTS  # noqa: E402
from miniserve.kernels import paged_attention  # noqa: E402
from miniserve.kernels.cache_write import reshape_and_cache_triton  # noqa: E402

GPU_BLOCK_N = {torch.float8_e4m3fn: 128, torch.float32: 64, torch.bfloat16: 64}
GPU_BLOCK_M = 64


@pytest.fixture
def hardware_fp8_decode(monkeypatch):
    """The decode mode a CUDA device picks for e4m3fn caches (KV_FP8_HW_PAIRS), on the interpreter."""
    original = decode_module.kv_mode

    def gpu_kv_mode(cache_dtype, device, fp8_decode="auto"):
        if cache_dtype == torch.float8_e4m3fn and fp8_decode == "auto":
            return decode_module.KV_FP8_HW_PAIRS, True, 1.0
        return original(cache_dtype, device, fp8_decode)

    monkeypatch.setattr(decode_module, "kv_mode", gpu_kv_mode)
    monkeypatch.setattr(extend_module, "kv_mode", gpu_kv_mode)


@triton.jit
def _decode_codes_kernel(codes_ptr, out_ptr, KV_MODE: tl.constexpr, NAN_ALL_ONES: tl.constexpr):
    offs = tl.arange(0, 256)
    x = decode_module.load_kv_tile(codes_ptr, offs, offs < 256, KV_MODE, NAN_ALL_ONES, tl.float32)
    tl.store(out_ptr + offs, x)


@pytest.mark.parametrize(
    "mode, fp8",
    [("bits", torch.float8_e4m3fn), ("bits", torch.float8_e4m3fnuz), ("hw", torch.float8_e4m3fn)],  # hw: e4m3fn only
    ids=["bits-e4m3fn", "bits-e4m3fnuz", "hw-e4m3fn"],
)
def test_fp8_page_decode_of_all_256_codes(mode, fp8):
    """Both decode paths of the attention kernels' tile load turn every code into its value (times the launcher's
    factor) and NaN codes into NaN. The hardware path is NVIDIA's e4m3fn conversion; the interpreter emulates it
    except for the two NaN codes (it gives +-480), which benchmarks/gpu_kernels.py checks on the GPU."""
    if mode == "hw":
        kv_mode, nan_all_ones, factor = decode_module.KV_FP8_HW, True, 1.0
    else:
        kv_mode, nan_all_ones, factor = decode_module.kv_mode(fp8, torch.device("cpu"), "bits")
    out = torch.empty(256, dtype=torch.float32)
    _decode_codes_kernel[(1,)](torch.arange(256, dtype=torch.int32).to(torch.uint8), out, kv_mode, nan_all_ones)
    got, want = out.numpy().astype(np.float64) * factor, all_code_values(fp8)
    if mode == "hw":
        assert np.isnan(want[[0x7F, 0xFF]]).all() and np.array_equal(np.abs(got[[0x7F, 0xFF]]), [480.0, 480.0])
        got[[0x7F, 0xFF]] = np.nan
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cache_dtype", list(GPU_BLOCK_N), ids=lambda d: str(d)[6:])
def test_attention_kernels_with_gpu_tiles_and_fp8_decode(hardware_fp8_decode, cache_dtype, q_dtype):
    """Decode and extend kernels with the GPU's tile sizes (and, for e4m3fn, its hardware FP8 decode) against the
    torch reference, on contexts shorter and longer than one tile."""
    from miniserve.kernels.decode_attention import decode_attention
    from miniserve.kernels.extend_attention import extend_attention

    block_n = GPU_BLOCK_N[cache_dtype]
    for seqs, kernel, kw in (
        (DECODE_SEQS + [(300, 1)], decode_attention, dict(block_n=block_n)),
        (EXTEND_SEQS + [(200, 70)], extend_attention, dict(block_n=block_n, block_m=GPU_BLOCK_M)),
    ):
        b = make_batch(seqs, 16, 4, 2, 64, cache_dtype, q_dtype, seed=len(seqs))
        want = paged_attention(b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3, backend="torch")
        got = kernel(b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3, **kw)
        torch.testing.assert_close(got.float(), want.float(), **tolerance(q_dtype))


@pytest.mark.parametrize("variant", list(FP8_VARIANTS))
def test_fp8_decode_variants_queued_for_the_gpu(variant):
    """Every FP8 launch variant that benchmarks/tune_decode_attention.py --fp8-variants times on the GPU, through
    both launchers, against the torch reference: GPU tile sizes unless the variant sets its own. The staged
    mode's PTX conversion cannot run here (the interpreter converts V like KV_FP8_HW): this checks its wiring,
    benchmarks/gpu_kernels.py its instruction."""
    from miniserve.kernels.decode_attention import decode_attention
    from miniserve.kernels.extend_attention import extend_attention

    kw = {"block_n": GPU_BLOCK_N[torch.float8_e4m3fn], **FP8_VARIANTS[variant]}
    if kw["fp8_decode"] == "auto":
        kw["fp8_decode"] = "hw-pairs"  # what "auto" is on a CUDA device
    for seqs, kernel, extra in (
        (DECODE_SEQS + [(300, 1)], decode_attention, {}),
        (EXTEND_SEQS + [(200, 70)], extend_attention, dict(block_m=GPU_BLOCK_M)),
    ):
        b = make_batch(seqs, 16, 4, 2, 64, torch.float8_e4m3fn, torch.bfloat16, seed=len(seqs))
        want = paged_attention(b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3, backend="torch")
        got = kernel(b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3, **kw, **extra)
        torch.testing.assert_close(got.float(), want.float(), **tolerance(torch.bfloat16))


# prompts with and without a cached prefix; (330, 150): three 64-token query blocks (two of 128), each with KV tiles
# wholly below the causal diagonal (split_diag's unmasked loop) and a diagonal one
EXTEND_VARIANT_SEQS = EXTEND_SEQS + [(330, 150)]


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("variant", list(EXTEND_VARIANTS))
def test_extend_variants_queued_for_the_gpu(hardware_fp8_decode, variant, cache_dtype):
    """Every extend launch variant that benchmarks/tune_extend_attention.py times on the GPU, against the torch
    reference with the GPU's tile sizes (unless the variant sets its own), GQA groups of 2 and 4. Variants that
    keep the query tile's rows (masking, grid order, offsets) must also equal the default bit for bit here: the
    same tiles in the same order. (Row counts change numpy's dot order, so those are compared to the reference
    only; and the interpreter fuses no multiply-add, which split_diag="fma" does on the GPU. The GPU run,
    gpu_kernels.py --checks extend_variants, reports bit-identity for all.)"""
    from miniserve.kernels.extend_attention import extend_attention

    kw = EXTEND_VARIANTS[variant]
    kw = {"block_n": GPU_BLOCK_N[cache_dtype], "block_m": GPU_BLOCK_M, **kw}
    same_rows = kw["block_m"] == GPU_BLOCK_M and not kw.get("gqa_pack")
    for q_heads in (4, 8) if "gqa_pack" in kw else (8,):  # GQA groups of 2 and 4 matter to the packing only
        args, want, default = _extend_variant_case(cache_dtype, q_heads)
        got = extend_attention(*args, **kw)
        torch.testing.assert_close(got.float(), want.float(), **tolerance(torch.bfloat16))
        if same_rows:
            assert torch.equal(got, default)


@functools.cache
def _extend_variant_case(cache_dtype: torch.dtype, q_heads: int) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """The arguments, the torch reference's answer and the default launch's (GPU tiles) of one variant case: the
    same for every variant, so worked out once (the interpreter takes seconds a launch)."""
    from miniserve.kernels.extend_attention import extend_attention

    b = make_batch(EXTEND_VARIANT_SEQS, 16, q_heads, 2, 64, cache_dtype, torch.bfloat16, seed=q_heads)
    args = (b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3)
    default = extend_attention(*args, block_n=GPU_BLOCK_N[cache_dtype], block_m=GPU_BLOCK_M)
    return args, paged_attention(*args, backend="torch"), default


def test_extend_variant_benchmarks_run_on_the_cpu():
    """The GPU scripts' extend-variant code on tiny cases here (timer stubbed), so it cannot rot:
    tune_extend_attention.py's chunked prompt against SDPA, and gpu_kernels.py's extend_variants check."""

    import benchmarks.tune_extend_attention as tune

    variants = ["default", "diag same", "pack w8 diagfma same"]
    rows = tune.measure(["qwen3-0.6b"], ["fp8"], variants, 48, 24, device="cpu", timer=lambda fn: (fn(), 1.0)[1])
    assert [r["variant"] for r in rows] == ["torch sdpa (whole prompt)", *variants]
    for r in rows[1:]:
        assert r["finite"] and r["max_abs_diff_to_sdpa"] < 0.1 and r["ms"] == 1.0
    assert rows[2]["identical_to_default"]  # the diagonal split: same tiles, same roundings
    case = (16, 4, 2, 64, torch.bfloat16, torch.bfloat16)
    rows = gpu_kernels.check_extend_variants(torch.device("cpu"), extend=[(40, 17), (100, 60), (5, 5)], cases=[case])
    assert len(rows) == len(EXTEND_VARIANTS) and all(r["ok"] for r in rows)
    assert "could not run" in gpu_kernels.summary({"extend_variants": rows})[0]


def test_fp8_pair_decode_of_all_65536_words():
    """The default V read's conversion (KV_FP8_HW_PAIRS) turns every int16 word into its low byte's e4m3fn value,
    then its high byte's: the cache's byte order, column 2j then 2j + 1. Here by Triton's cast (NaN codes give
    +-480, as in test_fp8_page_decode_of_all_256_codes); gpu_kernels.py's check runs its kernel on the GPU's PTX."""
    words = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    lo, hi = torch.empty(1 << 16, dtype=torch.float16), torch.empty(1 << 16, dtype=torch.float16)
    gpu_kernels._decode_words_kernel[(64,)](words, lo, hi)
    codes = words.numpy().view(np.uint8).reshape(-1, 2)  # little-endian: [:, 0] is the low byte
    values = all_code_values(torch.float8_e4m3fn)
    for got, byte in ((lo, codes[:, 0]), (hi, codes[:, 1])):
        want, got = values[byte], got.numpy().astype(np.float64)
        nan = np.isnan(want)
        assert nan.sum() == 2 * 256 and np.array_equal(np.abs(got[nan]), np.full(512, 480.0))
        np.testing.assert_array_equal(got[~nan], want[~nan])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_pair_read_of_v_equals_the_byte_read(head_dim):
    """The default FP8 V read (byte pairs, two dots of half the head_dim) against the byte-by-byte one ("hw"), in
    the decode kernel and in the extend kernel's 16-row tiles, whose dots run on mma.sync as decode's do; ragged
    contexts, splits, GQA groups of 4. The interpreter's dots make them equal bit for bit; on a GPU the MMA packs
    its operands differently and a few outputs move by an ulp (tune_decode_attention.py --fp8-variants)."""
    from miniserve.kernels.decode_attention import decode_attention
    from miniserve.kernels.extend_attention import extend_attention

    for seqs, kernel, kw in (
        (DECODE_SEQS + [(300, 1)], decode_attention, dict(block_n=128, split_tokens=128)),
        (EXTEND_SEQS + [(200, 70)], extend_attention, dict(block_n=128, block_m=16)),
    ):
        b = make_batch(seqs, 16, 8, 2, head_dim, torch.float8_e4m3fn, torch.bfloat16, seed=head_dim)
        args = (b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3)
        pairs, byte = kernel(*args, fp8_decode="hw-pairs", **kw), kernel(*args, fp8_decode="hw", **kw)
        assert torch.equal(pairs, byte)
        want = paged_attention(*args, backend="torch")
        torch.testing.assert_close(pairs.float(), want.float(), **tolerance(torch.bfloat16))


def test_pair_read_falls_back_where_words_do_not_fit(monkeypatch):
    """pairs_or_hw: the pair read needs an unpadded head_dim (a power of two from 16), 2-byte aligned rows and a
    tile of fewer than 64 query rows (mma.sync); elsewhere the byte read runs, and other modes pass through. A
    48-wide head (padded to 64) still decodes right."""
    from miniserve.kernels.decode_attention import decode_attention, pairs_or_hw

    pairs, hw = decode_module.KV_FP8_HW_PAIRS, decode_module.KV_FP8_HW
    cache = torch.zeros(4, 16, 2, 128, dtype=torch.uint8)
    got = [pairs_or_hw(pairs, d, cache, 16) for d in (8, 16, 48, 64, 96, 128, 256)]
    assert got == [hw, pairs, hw, pairs, hw, pairs, pairs]
    assert pairs_or_hw(pairs, 64, cache[..., 1:65], 16) == hw  # an odd start: words would straddle two columns
    assert pairs_or_hw(pairs, 63, cache[..., :63], 16) == hw
    assert [pairs_or_hw(pairs, 128, cache, rows) for rows in (16, 32, 63, 64, 128)] == [pairs] * 3 + [hw] * 2
    assert pairs_or_hw(decode_module.KV_FP8_HW_STAGED, 96, cache, 16) == decode_module.KV_FP8_HW_STAGED
    b = make_batch(DECODE_SEQS, 16, 4, 2, 48, torch.float8_e4m3fn, torch.bfloat16, seed=5)
    args = (b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3)
    got = decode_attention(*args, fp8_decode="hw-pairs")
    want = paged_attention(*args, backend="torch")
    torch.testing.assert_close(got.float(), want.float(), **tolerance(torch.bfloat16))


def test_fp8_decode_modes_are_checked():
    """ "hw", "hw-staged" and "hw-pairs" are NVIDIA's e4m3fn conversion: asked for on another format, they fail
    loudly; "auto" picks the pair read on NVIDIA GPUs only."""
    cpu = torch.device("cpu")
    assert decode_module.kv_mode(torch.float8_e4m3fn, cpu, "hw-staged") == (decode_module.KV_FP8_HW_STAGED, True, 1.0)
    assert decode_module.kv_mode(torch.float8_e4m3fn, cpu, "hw") == (decode_module.KV_FP8_HW, True, 1.0)
    assert decode_module.kv_mode(torch.float8_e4m3fn, cpu, "hw-pairs") == (decode_module.KV_FP8_HW_PAIRS, True, 1.0)
    assert decode_module.kv_mode(torch.float8_e4m3fn, cpu, "auto")[0] == decode_module.KV_FP8_BITS  # the interpreter
    assert decode_module.kv_mode(torch.bfloat16, cpu, "hw-staged")[0] == decode_module.KV_PLAIN
    with pytest.raises(ValueError, match="e4m3fn"):
        decode_module.kv_mode(torch.float8_e4m3fnuz, cpu, "hw-staged")
    with pytest.raises(ValueError, match="fp8_decode"):
        decode_module.kv_mode(torch.float8_e4m3fn, cpu, "fast")


@pytest.mark.parametrize("tile", [512, 2048], ids=["decode-step-tiles", "prompt-chunk-tiles"])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz], ids=lambda d: str(d)[6:])
def test_kv_write_with_gpu_tiles_is_bit_exact(fp8, tile):
    """The fused write in the GPU's programs (512 or 2048 elements, cache_write._tile_shape: many programs, masked
    tails) on all 65,536 bf16 patterns, against the oracle; a ragged token count and head size exercise the masks."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    key, value = x.reshape(512, 1, 128), x.flip(0).reshape(512, 1, 128)
    slots = torch.randperm(512, generator=torch.Generator().manual_seed(3))
    kc = torch.zeros(32, 16, 1, 128, dtype=torch.uint8).view(fp8)
    vc = torch.zeros_like(kc)
    scale = torch.tensor([0.37])
    reshape_and_cache_triton(key, value, kc, vc, slots, scale, scale, tile_elements=tile)
    want = quantize_bytes(x, 0.37, fp8).reshape(512, 128)
    assert np.array_equal(kc.view(torch.uint8).reshape(512, 128)[slots].numpy(), want)
    assert np.array_equal(vc.view(torch.uint8).reshape(512, 128)[slots].numpy(), want[::-1, ::-1].copy())
    ragged = torch.randn(37, 3, 80, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16) * 100
    kc = torch.zeros(8, 16, 3, 80, dtype=torch.uint8).view(fp8)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(8 * 16, generator=torch.Generator().manual_seed(5))[:37]
    reshape_and_cache_triton(ragged, ragged, kc, vc, slots, scale, scale, tile_elements=tile)
    got = kc.view(torch.uint8).reshape(128, 3, 80)[slots].numpy()
    assert np.array_equal(got, quantize_bytes(ragged, 0.37, fp8))


def test_gpu_tile_shape_by_step_size(monkeypatch):
    """512 elements a program up to 2^20 elements a write (a decode step's tokens), 2048 past it (prompt chunks):
    the boundary exactly, and one token over."""
    from miniserve.kernels import cache_write

    monkeypatch.setattr(cache_write, "triton_interpreter_enabled", lambda: False)
    assert cache_write._tile_shape(256, 8 * 128, None) == (1, 512)  # nano's decode step: 256 tokens x 8 x 128
    assert cache_write._tile_shape(1024, 8 * 128, None) == (1, 512)  # exactly 2^20 elements
    assert cache_write._tile_shape(1025, 8 * 128, None) == (2, 1024)  # one token over: 2048 a program
    assert cache_write._tile_shape(1, 8 * 64, None) == (1, 512)
    assert cache_write._tile_shape(64, 8 * 64, 2048) == (4, 512)  # an explicit size wins
    # a rotating write tiles (head, d < D/2) pairs, two elements each: half as many a program, same thresholds
    assert cache_write._tile_shape(1024, 8 * 64, None, pairs=True) == (1, 256)
    assert cache_write._tile_shape(1025, 8 * 64, None, pairs=True) == (2, 512)
    assert cache_write._tile_shape(64, 8 * 32, 2048, pairs=True) == (4, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_silu_and_mul_with_gpu_column_blocks(monkeypatch, dtype):
    """SiLU*mul in 1024-column programs (the GPU's block) for an MLP width of 2,816 (several blocks, a ragged
    last one): bit for bit what the interpreter's single 4096-column block computes (tests/test_layer_ops.py
    compares that with the reference)."""
    x = torch.randn(5, 2 * 2816, generator=torch.Generator().manual_seed(0)).to(dtype) * 4
    one_block = layer_ops.silu_and_mul(x, backend="triton")
    monkeypatch.setattr(layer_ops, "triton_interpreter_enabled", lambda: False)  # the launcher's GPU block
    out = torch.empty(5, 2816, dtype=dtype)
    layer_ops._silu_and_mul_triton(x, out, False)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(out.view(bits), one_block.view(bits))


def test_extend_launch_config_by_shape(monkeypatch):
    """The extend launch by shape, as measured on the H200 (extend_attention.launch_config): long bf16 prompts at
    head_dim 128 on NVIDIA get 128-row tiles with a register cap; from LONG_QUERY new tokens, not one fewer; FP8
    caches, other head sizes and the interpreter keep their tiles, FP8 caches at head_dim 64 get a register cap; the
    diagonal split everywhere but on ROCm."""
    import miniserve.kernels.extend_attention as ext

    monkeypatch.setattr(ext, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(ext, "is_rocm", lambda: False)
    cuda = torch.device("cuda")
    long = ext.launch_config(128, torch.bfloat16, ext.LONG_QUERY, cuda)
    assert long == dict(block_m=128, num_warps=8, num_stages=3, maxnreg=128, split_diag=True, same_kv_strides=True)
    assert ext.launch_config(128, torch.float16, 32768, cuda) == long
    short = dict(block_m=64, num_warps=4, num_stages=2, maxnreg=None, split_diag=True, same_kv_strides=True)
    assert ext.launch_config(128, torch.bfloat16, ext.LONG_QUERY - 1, cuda) == short
    assert ext.launch_config(128, torch.float8_e4m3fn, 32768, cuda) == short
    assert ext.launch_config(64, torch.bfloat16, 32768, cuda) == short
    assert ext.launch_config(64, torch.float8_e4m3fn, 512, cuda) == dict(short, maxnreg=168)
    assert ext.launch_config(64, torch.float8_e4m3fn, 32768, cuda) == dict(short, maxnreg=168)
    plain = dict(short, split_diag=False, same_kv_strides=False)  # mul_rn is PTX: not on ROCm
    assert ext.launch_config(128, torch.bfloat16, 32768, torch.device("cpu")) == plain
    monkeypatch.setattr(ext, "is_rocm", lambda: True)
    assert ext.launch_config(128, torch.bfloat16, 32768, cuda) == plain
    assert ext.launch_config(64, torch.float8_e4m3fnuz, 512, cuda) == plain
    monkeypatch.setattr(ext, "triton_interpreter_enabled", lambda: True)
    assert ext.launch_config(128, torch.bfloat16, 32768, cuda) == dict(short, block_m=16)


def test_extend_explicit_launch_arguments_win(monkeypatch):
    """What a caller passes overrides launch_config, key by key (the benchmarks' variants rely on it)."""
    import miniserve.kernels.extend_attention as ext

    seen = []
    monkeypatch.setattr(ext, "_variant_constants", lambda *a: seen.append(a) or {})
    b = make_batch([(20, 5)], 16, 4, 2, 64, torch.bfloat16, torch.bfloat16, seed=0)  # any shape: the launch is asked
    args = (b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3)
    ext.extend_attention(*args)
    ext.extend_attention(*args, split_diag=False, same_kv_strides=False)
    assert [a[1:] for a in seen] == [(True, False, True), (False, False, False)]
    # on ROCm the split (PTX's mul.rn) is refused by name when asked for, not left to fail in the compiler
    monkeypatch.setattr(ext, "is_rocm", lambda: True)
    monkeypatch.setattr(ext, "triton_interpreter_enabled", lambda: False)
    with pytest.raises(ValueError, match="split_diag rounds through PTX's mul.rn"):
        ext.extend_attention(*args, split_diag=True)


def test_decode_register_cap_by_shape(monkeypatch):
    """decode_attention.default_register_cap, by the V read the kernel runs: 96 registers for the pair read, 128
    for the byte read at head_dim 64 or 128 on NVIDIA (bit-identical, faster on the H200); none for bf16, the
    exact bit-field decode, the staged read, unmeasured head sizes, ROCm and the interpreter."""
    import miniserve.kernels.decode_attention as dec

    monkeypatch.setattr(dec, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(dec, "is_rocm", lambda: False)
    cuda = torch.device("cuda")
    assert dec.default_register_cap(128, dec.KV_FP8_HW_PAIRS, cuda) == dec.PAIRS_FP8_REGISTERS == 96
    assert dec.default_register_cap(64, dec.KV_FP8_HW_PAIRS, cuda) == 96
    assert dec.default_register_cap(128, dec.KV_FP8_HW, cuda) == dec.EXACT_FP8_REGISTERS == 128
    for mode in (dec.KV_PLAIN, dec.KV_FP8_BITS, dec.KV_FP8_HW_STAGED):
        assert dec.default_register_cap(128, mode, cuda) == 0
    assert dec.default_register_cap(96, dec.KV_FP8_HW_PAIRS, cuda) == 0
    assert dec.default_register_cap(256, dec.KV_FP8_HW_PAIRS, cuda) == 0
    assert dec.default_register_cap(128, dec.KV_FP8_HW_PAIRS, torch.device("cpu")) == 0
    monkeypatch.setattr(dec, "is_rocm", lambda: True)
    assert dec.default_register_cap(128, dec.KV_FP8_HW, cuda) == 0
    monkeypatch.setattr(dec, "is_rocm", lambda: False)
    monkeypatch.setattr(dec, "triton_interpreter_enabled", lambda: True)
    assert dec.default_register_cap(128, dec.KV_FP8_HW_PAIRS, cuda) == 0


def test_decode_cap_follows_the_read_that_runs(monkeypatch):
    """A cache the pair read cannot take (rows at odd byte offsets) falls back to the byte read, and its launch gets
    the byte read's cap, not the pair read's."""
    import miniserve.kernels.decode_attention as dec

    modes = []
    monkeypatch.setattr(dec, "default_register_cap", lambda head_dim, mode, device: modes.append(mode) or 0)
    b = make_batch([(40, 1)], 16, 4, 2, 64, torch.float8_e4m3fn, torch.bfloat16, seed=0)
    args = (b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3)
    wide = torch.zeros((*b.value_cache.shape[:3], 65), dtype=torch.uint8).view(torch.float8_e4m3fn)
    wide[..., 1:] = b.value_cache  # the same values, each row one byte further on
    odd = wide[..., 1:]
    dec.decode_attention(*args, fp8_decode="hw-pairs")
    dec.decode_attention(b.q, b.key_cache, odd, *args[3:], fp8_decode="hw-pairs")
    assert modes == [dec.KV_FP8_HW_PAIRS, dec.KV_FP8_HW]


def test_decode_launch_takes_the_cap_unless_asked(monkeypatch):
    """decode_attention launches with default_register_cap's cap when maxnreg is None, and with none at 0."""
    import miniserve.kernels.decode_attention as dec

    caps = []
    monkeypatch.setattr(dec, "default_register_cap", lambda *a: 168)
    monkeypatch.setattr(dec, "register_cap", lambda n: caps.append(n) or {})
    b = make_batch([(40, 1), (17, 1)], 16, 4, 2, 64, torch.float8_e4m3fn, torch.bfloat16, seed=0)
    args = (b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3)
    dec.decode_attention(*args)
    dec.decode_attention(*args, maxnreg=0)
    assert caps == [168, 0]


def test_pdl_chain_small_kernel_reads_strided_rows():
    """benchmarks/pdl_chain.py's stand-in for the small kernels between GEMMs, on the first columns of a wider
    matrix (what the chain gives it before the down projection): every row read at its own stride."""
    from benchmarks.pdl_chain import tiny

    z = torch.randn(3, 40)
    got = tiny(z[:, :24], pdl=False)
    assert got.is_contiguous() and torch.equal(got, z[:, :24] * 0.5)
