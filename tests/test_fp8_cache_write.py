"""FP8 quantization semantic and the fused KV write (`reshape_and_cache`), bit for bit.

The oracle for the FP8 bytes (tests/fp8_oracle.py) is built from first principles (decode all 256 codes
arithmetically, pick the nearest code with ties to the even code in numpy fp32/fp64) and imports nothing from
miniserve, so neither the reference nor the kernel is tested against itself. The Triton kernel runs in the CPU
interpreter (TRITON_INTERPRET=1, set before Triton is imported).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from fp8_oracle import all_code_values, quantize_bytes  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from miniserve.kernels import (  # noqa: E402
    dequantize_fp8_reference,
    fp8_format,
    fp8_max,
    quantize_fp8_reference,
    reshape_and_cache,
)

FP8 = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]
SCALES = [1.0, 0.37, 3.0, 1e-3, 1e3]
INPUTS = [torch.bfloat16, torch.float16]
COMBOS = [(src, fp8, s) for src in INPUTS for fp8 in FP8 for s in SCALES]
COMBO_IDS = [f"{str(src)[6:]}-{str(fp8)[6:]}-scale{s:g}" for src, fp8, s in COMBOS]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow/NaN notes from the interpreter


def dtype_id(x):
    return str(x)[6:] if isinstance(x, torch.dtype) else None


def all_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    """All 65,536 values of a 16-bit float dtype, NaNs and infinities included."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def scale_tensor(s: float) -> torch.Tensor:
    return torch.tensor([s], dtype=torch.float32)


@pytest.mark.parametrize("src,fp8,scale", COMBOS, ids=COMBO_IDS)
def test_reference_quantization_matches_oracle_for_every_bit_pattern(src, fp8, scale):
    x = all_bit_patterns(src)
    got = quantize_fp8_reference(x, scale_tensor(scale), fp8).view(torch.uint8).numpy()
    want = quantize_bytes(x, scale, fp8)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, (
        f"{bad.size} mismatches, first x={x[bad[:5]].tolist()} got={got[bad[:5]]} want={want[bad[:5]]}"
    )


@pytest.mark.parametrize("fp8", FP8, ids=dtype_id)
def test_pinned_corner_cases(fp8):
    x = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 1e6, -1e6, 0.0, -0.0, -1e-30])
    got = quantize_fp8_reference(x, scale_tensor(1.0), fp8).view(torch.uint8).tolist()
    if fp8 == torch.float8_e4m3fn:  # max 448 = 0x7E, NaN 0x7F, signed zeros
        assert got == [0x7F, 0x7F, 0x7E, 0xFE, 0x7E, 0xFE, 0x00, 0x80, 0x80]
    else:  # max 240 = 0x7F, the only NaN 0x80, one zero
        assert got == [0x80, 0x80, 0x7F, 0xFF, 0x7F, 0xFF, 0x00, 0x00, 0x00]
    assert all_code_values(fp8)[got[2]] == fp8_format(fp8).max_value


@pytest.mark.parametrize("fp8", FP8, ids=dtype_id)
def test_dequantize_is_value_times_scale(fp8):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = all_code_values(fp8).astype(np.float32) * np.float32(0.37)  # one fp32 rounding
    got = dequantize_fp8_reference(codes.view(fp8), scale_tensor(0.37)).numpy()
    np.testing.assert_array_equal(got, want)
    # Round trip: every finite code survives quantize(dequantize(code)) with the same scale.
    finite = ~np.isnan(want)
    back = quantize_fp8_reference(torch.from_numpy(got), scale_tensor(0.37), fp8).view(torch.uint8)
    assert torch.equal(back[torch.from_numpy(finite)], codes[torch.from_numpy(finite)])


@pytest.mark.parametrize("src,fp8,scale", COMBOS, ids=COMBO_IDS)
def test_triton_kernel_bit_exact_for_every_bit_pattern(src, fp8, scale):
    """All 65,536 inputs as K (and reversed as V) in one launch: 512 tokens x 1 head x 128 dims."""
    x = all_bit_patterns(src)
    key, value = x.reshape(512, 1, 128), x.flip(0).reshape(512, 1, 128)
    slots = torch.randperm(512, generator=torch.Generator().manual_seed(7))
    kc = torch.zeros(32, 16, 1, 128, dtype=torch.uint8).view(fp8)
    vc = torch.zeros_like(kc)
    s = scale_tensor(scale)
    reshape_and_cache(key, value, kc, vc, slots, s, s, backend="triton")
    want = quantize_bytes(x, scale, fp8)
    for cache, want_tok in ((kc, want.reshape(512, 128)), (vc, want[::-1].reshape(512, 128))):
        got = cache.view(torch.uint8).reshape(512, 128)[slots].numpy()
        bad = np.nonzero(got != want_tok)
        assert bad[0].size == 0, f"{bad[0].size} mismatching bytes, got {got[bad][:5]} want {want_tok[bad][:5]}"


# Power-of-two scales take the kernel's multiply-by-the-reciprocal path (cache_write.divide_rn) from 2^-126 to 2^126,
# where the reciprocal is a normal float; 2^-127 (a subnormal scale) and 2^127 (a subnormal reciprocal) divide.
POW2_EDGES = [2.0**-126, 2.0**-127, 2.0**126, 2.0**127, 0.25]


@pytest.mark.parametrize("scale", POW2_EDGES, ids=lambda s: f"scale{s:g}")
@pytest.mark.parametrize("fp8", FP8, ids=dtype_id)
def test_triton_kernel_bit_exact_at_power_of_two_scale_edges(fp8, scale):
    x = all_bit_patterns(torch.bfloat16)
    key = x.reshape(512, 1, 128)
    slots = torch.arange(512)
    kc = torch.zeros(32, 16, 1, 128, dtype=torch.uint8).view(fp8)
    reshape_and_cache(key, key, kc, torch.zeros_like(kc), slots, scale_tensor(scale), scale_tensor(scale), "triton")
    got = kc.view(torch.uint8).reshape(-1).numpy()
    want = quantize_bytes(x, scale, fp8)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, f"{bad.size} mismatching bytes, first x={x[bad[:5]].tolist()} got {got[bad[:5]]}"


# ---------------------------------------------------------------- reshape_and_cache: the engine's KV write


def make_cache(num_blocks, block_size, heads, dim, dtype, poison=0xA5):
    """A cache filled with a poison byte so that untouched slots are detectable."""
    raw = torch.full((num_blocks, block_size, heads, dim * torch.empty(0, dtype=dtype).element_size()), poison)
    return raw.to(torch.uint8).view(dtype)


def expected_bytes(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    if cache_dtype in FP8:
        return torch.from_numpy(quantize_bytes(x, scale, cache_dtype).reshape(x.shape))
    return x.to(cache_dtype).contiguous().view(torch.uint8)


def check_write(key, value, cache_dtype, block_size, slots, impl, k_scale=0.37, v_scale=3.0, num_blocks=None):
    heads, dim = key.shape[1], key.shape[2]
    num_blocks = num_blocks or (int(slots.max()) // block_size + 2 if slots.numel() else 1)
    kc = make_cache(num_blocks, block_size, heads, dim, cache_dtype)
    vc = make_cache(num_blocks, block_size, heads, dim, cache_dtype)
    k_before, v_before = kc.view(torch.uint8).clone(), vc.view(torch.uint8).clone()
    reshape_and_cache(key, value, kc, vc, slots, scale_tensor(k_scale), scale_tensor(v_scale), backend=impl)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    keep = slots >= 0
    written[slots[keep]] = True
    for src, cache, before, scale in ((key, kc, k_before, k_scale), (value, vc, v_before, v_scale)):
        flat = cache.view(torch.uint8).reshape(num_blocks * block_size, heads, -1)
        before = before.reshape(num_blocks * block_size, heads, -1)
        assert torch.equal(flat[~written], before[~written]), "a slot that was not written changed"
        want = expected_bytes(src[keep], cache_dtype, scale)
        assert torch.equal(flat[slots[keep]], want)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("cache_dtype", [*FP8, torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_negative_slots_skipped_and_noncontiguous_inputs(impl, cache_dtype):
    g = torch.Generator().manual_seed(0)
    tokens, heads, dim, block_size = 37, 2, 80, 8
    qkv = torch.randn(tokens, 3 * heads + 1, dim, generator=g).to(torch.bfloat16) * 50  # a fused qkv projection
    key, value = qkv[:, heads : 2 * heads], qkv[:, 2 * heads + 1 :]  # strided views
    assert not key.is_contiguous() and not value.is_contiguous()
    slots = torch.randperm(20 * block_size, generator=g)[:tokens]
    slots[::5] = -1
    check_write(key, value, cache_dtype, block_size, slots, impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_sizes(impl, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    key = torch.randn(9, 3, head_dim, generator=g, dtype=torch.float16) * 100
    value = torch.randn(9, 3, head_dim, generator=g, dtype=torch.float16)
    slots = torch.randperm(64, generator=g)[:9]
    check_write(key, value, torch.float8_e4m3fn, 16, slots, impl)


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_plain_cache_store_equals_cast(src, cache_dtype):
    g = torch.Generator().manual_seed(1)
    key = torch.randn(12, 2, 64, generator=g).to(src) * 1e4
    key[0, 0, :4] = torch.tensor([float("inf"), -float("inf"), 1e-40, -0.0])
    value = torch.randn(12, 2, 64, generator=g).to(src) * 1e-3
    slots = torch.randperm(48, generator=g)[:12]
    check_write(key, value, cache_dtype, 4, slots, "triton")


@settings(max_examples=8, deadline=None)
@given(
    tokens=st.integers(0, 24),
    heads=st.integers(1, 4),
    dim=st.sampled_from([16, 48, 64, 80]),
    block_size=st.sampled_from([1, 4, 16]),
    cache_dtype=st.sampled_from([*FP8, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(tokens, heads, dim, block_size, cache_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(tokens, heads, dim, generator=g, dtype=torch.float32).to(torch.bfloat16) * 30
    value = torch.randn(tokens, heads, dim, generator=g, dtype=torch.float32).to(torch.bfloat16)
    slots = torch.randperm(tokens + 8, generator=g)[:tokens]
    if tokens:
        slots[torch.rand(tokens, generator=g) < 0.2] = -1
    for impl in ("torch", "triton"):
        check_write(key, value, cache_dtype, block_size, slots, impl, num_blocks=(tokens + 8) // block_size + 1)


@pytest.mark.parametrize("fp8", FP8, ids=dtype_id)
def test_scale_is_used_in_fp32_whatever_its_dtype(fp8):
    """The semantic divides in fp32: a float64 scale is rounded to fp32 first (not a float64 division), and
    dequantization multiplies in fp32 and returns fp32."""
    x = all_bit_patterns(torch.float16)
    near_one = torch.tensor([1 + 2**-30], dtype=torch.float64)  # 1.0 in fp32; in fp64 it breaks the exact ties
    got = quantize_fp8_reference(x, near_one, fp8).view(torch.uint8).numpy()
    assert np.array_equal(got, quantize_bytes(x, 1.0, fp8))
    scale64 = torch.tensor([0.37], dtype=torch.float64)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8)
    out = dequantize_fp8_reference(codes, scale64)
    want = all_code_values(fp8).astype(np.float32) * np.float32(0.37)
    assert out.dtype == torch.float32 and np.array_equal(out.numpy(), want, equal_nan=True)


def test_format_facts_and_errors():
    assert (fp8_max(torch.float8_e4m3fn), fp8_max(torch.float8_e4m3fnuz)) == (448.0, 240.0)
    with pytest.raises(ValueError, match=r"not an FP8 KV-cache dtype: torch.bfloat16; expected one of \[torch\.float8"):
        fp8_format(torch.bfloat16)
