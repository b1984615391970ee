"""Fused layer ops (RMSNorm + residual, RoPE, SiLU-and-mul): Triton kernels vs the torch arithmetic of llama.py.

Rotary and the residual sum must be bit-identical (compared as integer bit patterns, so -0.0, NaN and inf
count); the normalised output and SiLU go through rsqrt / exp / a reduction whose order differs, so they are
held to one ulp of the dtype. Independent oracles: transformers' `apply_rotary_pos_emb` and `LlamaRMSNorm`,
and an fp64 SiLU. The kernels run in the CPU interpreter (TRITON_INTERPRET=1, set before Triton is imported).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from fp8_oracle import quantize_bytes_tensor  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb  # noqa: E402

from miniserve.kernels import reshape_and_cache  # noqa: E402
from miniserve.kernels.layer_ops import (  # noqa: E402
    Rope,
    apply_rotary_reference_,
    qk_rms_norm,
    rms_norm,
    rms_norm_reference,
    silu_and_mul,
    silu_and_mul_reference,
)
from miniserve.models.config import ModelConfig  # noqa: E402
from miniserve.models.llama import Rotary  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One ulp of the dtype, relative (fp32: a loose 1e-5). rms_norm and silu_and_mul round an approximate value
# (rsqrt, exp) to the dtype and multiply it by a second operand: one ulp off there can be two in the product.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}
MAX_POSITIONS = 1024
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow/NaN notes from the interpreter


def dtype_id(x):
    return str(x)[6:] if isinstance(x, torch.dtype) else None


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.element_size() == 4 else torch.int16)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same bits everywhere (so -0.0 != 0.0), except that a NaN only has to be a NaN: its payload is a
    backend detail (torch's own CPU bf16 NaN is 0x7FC0 or 0xFFFF depending on the code path, CUDA's 0x7FFF)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    both_nan = actual.isnan() & expected.isnan()
    diff = ((bits(actual) != bits(expected)) & ~both_nan).sum().item()
    assert diff == 0, f"{diff} of {actual.numel()} elements differ bitwise"


def with_specials(x: torch.Tensor) -> torch.Tensor:
    """Put signed zeros, a subnormal, the dtype's largest value, infinities and a NaN into row 0 of x."""
    info = torch.finfo(x.dtype)
    specials = [-0.0, 0.0, info.smallest_normal / 4, -info.max, info.max, float("inf"), -float("inf"), float("nan")]
    flat = x.view(x.shape[0], -1)
    flat[0, : len(specials)] = torch.tensor(specials, dtype=x.dtype)
    return x


def rotary_tables(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32,
            "hidden_size": 4 * head_dim,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "head_dim": head_dim,
            "rope_theta": 10000.0,
        }
    )
    rotary = Rotary(cfg, MAX_POSITIONS)
    return rotary.cos, rotary.sin


def packed_qkv(num_tokens, hq, hk, head_dim, dtype, gen):
    """A packed qkv projection output [T, (Hq + 2 Hk) * D] with 3 extra padding columns (odd row stride)."""
    width = (hq + 2 * hk) * head_dim
    qkv = (torch.randn(num_tokens, width + 3, generator=gen) * 4).to(dtype)[:, :width]
    return with_specials(qkv)


def split_qkv(qkv, hq, hk, head_dim):
    t = qkv.shape[0]
    q = qkv[:, : hq * head_dim].view(t, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(t, hk, head_dim)
    v = qkv[:, (hq + hk) * head_dim :]
    return q, k, v


# ---------------------------------------------------------------------------------------------------- rotary


def rotate(q, k, positions, cos, sin, backend="triton"):
    """RoPE as the layers run it: inside the KV write (the caches here are throwaway, in k's dtype)."""
    t, hk, d = k.shape
    v = torch.zeros_like(k)
    cache = torch.zeros(max(t, 1), 1, hk, d, dtype=k.dtype)
    slots = torch.arange(t)
    one = torch.ones(1)
    reshape_and_cache(k, v, cache, cache.clone(), slots, one, one, backend, Rope(q, positions, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hq,hk,head_dim", [(4, 2, 64), (4, 2, 128), (6, 3, 96)])
def test_rotary_bit_exact_on_strided_qkv_views(dtype, hq, hk, head_dim):
    gen = torch.Generator().manual_seed(head_dim + hq)
    num_tokens = 9
    cos, sin = rotary_tables(head_dim)
    positions = torch.randint(0, 1000, (num_tokens,), generator=gen)
    positions[1] = 0
    qkv = packed_qkv(num_tokens, hq, hk, head_dim, dtype, gen)
    expected, actual = qkv.clone(), qkv.clone()

    q, k, _ = split_qkv(expected, hq, hk, head_dim)
    apply_rotary_reference_(q, k, positions, cos, sin)
    q, k, v = split_qkv(actual, hq, hk, head_dim)
    rotate(q, k, positions, cos, sin)

    assert_bit_equal(actual, expected)
    assert_bit_equal(v, split_qkv(qkv, hq, hk, head_dim)[2])  # v untouched
    assert not torch.equal(bits(actual), bits(qkv))  # the rotation did something


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rotary_matches_transformers(dtype):
    """Oracle: transformers' rotate_half formulation, [batch, heads, seq, dim] layout."""
    gen = torch.Generator().manual_seed(7)
    hq, hk, head_dim, num_tokens = 4, 2, 64, 11
    cos, sin = rotary_tables(head_dim)
    positions = torch.randint(0, 1000, (num_tokens,), generator=gen)
    q, k, _ = split_qkv(packed_qkv(num_tokens, hq, hk, head_dim, dtype, gen), hq, hk, head_dim)
    hf_q, hf_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[positions][None].to(dtype), sin[positions][None].to(dtype)
    )
    rotate(q, k, positions, cos, sin)
    assert_bit_equal(q.contiguous(), hf_q[0].transpose(0, 1).contiguous())
    assert_bit_equal(k.contiguous(), hf_k[0].transpose(0, 1).contiguous())


ROTATING_WRITES = [
    (torch.bfloat16, torch.float8_e4m3fn),
    (torch.bfloat16, torch.float8_e4m3fnuz),
    (torch.float16, torch.float8_e4m3fn),
    (torch.float32, torch.float8_e4m3fn),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.bfloat16),
    (torch.float32, torch.float32),
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype,cache_dtype", ROTATING_WRITES, ids=lambda x: dtype_id(x))
def test_rotating_kv_write_matches_transformers_and_the_fp8_oracle(dtype, cache_dtype, impl):
    """reshape_and_cache(rope=...), the layers' one launch for RoPE and the KV write: q and k come out rotated
    exactly as transformers rotates them, v untouched, and the pages of the written slots hold exactly that
    rotated k (and v) -- for FP8 the independent oracle's bytes, at a dividing scale (0.37) and a power-of-two one
    (1.0) -- while a skipped slot (-1) leaves its page alone. head_dim 96: the 48 pairs of a head are not a power
    of two; row 0 holds signed zeros, a subnormal, the largest values, infinities and a NaN."""
    gen = torch.Generator().manual_seed(11)
    hq, hk, head_dim, num_tokens, block_size = 6, 2, 96, 13, 4
    cos, sin = rotary_tables(head_dim)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)
    qkv = packed_qkv(num_tokens, hq, hk, head_dim, dtype, gen)
    q, k, v = split_qkv(qkv, hq, hk, head_dim)
    v = v.view(num_tokens, hk, head_dim)
    v_before = v.clone()
    hf_q, hf_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[positions][None].to(dtype), sin[positions][None].to(dtype)
    )
    slots = torch.randperm(8 * block_size, generator=gen)[:num_tokens]
    slots[2] = -1
    poison = torch.full((8, block_size, hk, head_dim * cache_dtype.itemsize), 0xA5, dtype=torch.uint8)
    kc, vc = poison.clone().view(cache_dtype), poison.clone().view(cache_dtype)
    k_scale, v_scale = torch.tensor([0.37]), torch.tensor([1.0])

    reshape_and_cache(k, v, kc, vc, slots, k_scale, v_scale, impl, Rope(q, positions, cos, sin))

    assert_bit_equal(q.contiguous(), hf_q[0].transpose(0, 1).contiguous())
    assert_bit_equal(k.contiguous(), hf_k[0].transpose(0, 1).contiguous())
    assert_bit_equal(v, v_before)
    written = slots >= 0
    for cache, x, scale in ((kc, k, 0.37), (vc, v, 1.0)):
        pages = cache.view(torch.uint8).view(-1, hk, head_dim * cache_dtype.itemsize)
        if cache_dtype.itemsize == 1:
            want = quantize_bytes_tensor(x[written], scale, cache_dtype)
            assert torch.equal(pages[slots[written]], want)
        else:
            stored = pages[slots[written]].view(cache_dtype)
            assert_bit_equal(stored, x[written].to(cache_dtype))
        untouched = torch.ones(pages.shape[0], dtype=torch.bool)
        untouched[slots[written]] = False
        assert (pages[untouched] == 0xA5).all()


# -------------------------------------------------------------------------------------------------- rms_norm


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = LlamaRMSNorm(x.shape[-1], eps=eps).to(x.dtype)
    norm.weight.data.copy_(weight)
    with torch.no_grad():
        return norm(x)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("hidden", [64, 128, 256, 320])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_matches_reference(dtype, hidden, with_residual):
    gen = torch.Generator().manual_seed(hidden)
    eps = 1e-6
    num_tokens = 5
    x = (torch.randn(num_tokens, hidden + 8, generator=gen) * 3).to(dtype)[:, 3 : 3 + hidden]  # row stride H+8
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    residual = torch.randn(num_tokens, hidden, generator=gen).to(dtype) if with_residual else None

    actual = rms_norm(x, weight, eps, residual, backend="triton")
    expected = rms_norm_reference(x, weight, eps, residual)
    if with_residual:
        (actual, actual_sum), (expected, expected_sum) = actual, expected
        assert_bit_equal(actual_sum, expected_sum)
        assert_bit_equal(actual_sum, x + residual)
        assert actual_sum.is_contiguous()
    assert actual.dtype == dtype and actual.is_contiguous()
    torch.testing.assert_close(actual, expected, rtol=2 * RTOL[dtype], atol=0)
    if dtype == torch.bfloat16:
        oracle = hf_rms_norm(x if residual is None else x + residual, weight, eps)
        torch.testing.assert_close(actual, oracle, rtol=2 * RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_residual_sum_bit_exact_with_specials(dtype):
    """Overflow to inf, inf - inf = NaN, signed zeros and subnormals: s is torch's add, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    x = with_specials(torch.randn(4, 96, generator=gen).to(dtype))
    residual = with_specials(torch.randn(4, 96, generator=gen).to(dtype)).flip(-1).contiguous()
    residual[0, :8] = torch.tensor([0.0, -0.0, 0.0, -1.0, 1.0, float("-inf"), 1.0, 0.0], dtype=dtype)
    weight = torch.rand(96, generator=gen).to(dtype)
    out, summed = rms_norm(x, weight, 1e-5, residual, backend="triton")
    expected_out, expected_sum = rms_norm_reference(x, weight, 1e-5, residual)
    assert_bit_equal(summed, expected_sum)
    assert summed[0, :8].isnan().tolist() == [False, False, False, False, False, True, False, True]
    torch.testing.assert_close(out, expected_out, rtol=2 * RTOL[dtype], atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_per_head_on_strided_view(dtype):
    """[T, heads, D] strided views (Qwen3's per-head q/k norm on a packed qkv) normalise each head."""
    gen = torch.Generator().manual_seed(5)
    q, k, _ = split_qkv((torch.randn(6, 8 * 32, generator=gen)).to(dtype), 4, 2, 32)
    weight = torch.rand(32, generator=gen).to(dtype)
    padded_heads = torch.randn(6, 3, 40, generator=gen).to(dtype)[..., 5:37]  # head stride 40 != head_dim
    for x in (q, k, padded_heads):
        actual = rms_norm(x, weight, 1e-6, backend="triton")
        torch.testing.assert_close(actual, rms_norm_reference(x, weight, 1e-6), rtol=2 * RTOL[dtype], atol=0)
    residual = torch.randn(q.shape, generator=gen).to(dtype)
    _, summed = rms_norm(q, weight, 1e-6, residual, backend="triton")
    assert_bit_equal(summed, q + residual)


@pytest.mark.parametrize("hq,hk", [(4, 2), (1, 1), (2, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_qk_rms_norm_is_q_norm_then_k_norm_in_one_launch(dtype, hq, hk):
    """Qwen3's q_norm and k_norm over the q and k heads of a packed qkv, one launch: each head takes its own
    weight (the first k head is k's, the last q head q's), the bits of two rms_norm calls, close to HF's norm."""
    gen = torch.Generator().manual_seed(hq * 10 + hk)
    head_dim = 64
    qkv = (torch.randn(5, (hq + 2 * hk) * head_dim, generator=gen) * 3).to(dtype)
    q, k, _ = split_qkv(qkv, hq, hk, head_dim)
    qk = qkv.view(5, hq + 2 * hk, head_dim)[:, : hq + hk]
    weight = (torch.rand(2, head_dim, generator=gen) + 0.5).to(dtype)
    actual = qk_rms_norm(qk, weight, hq, 1e-6, backend="triton")
    assert actual.shape == qk.shape and actual.is_contiguous()
    each = [rms_norm(x, w, 1e-6, backend="triton") for x, w in ((q, weight[0]), (k, weight[1]))]
    assert_bit_equal(actual, torch.cat(each, dim=1))
    oracle = torch.cat([hf_rms_norm(q, weight[0], 1e-6), hf_rms_norm(k, weight[1], 1e-6)], dim=1)
    torch.testing.assert_close(actual, oracle, rtol=2 * RTOL[dtype], atol=0)
    torch.testing.assert_close(qk_rms_norm(qk, weight, hq, 1e-6, backend="torch"), oracle, rtol=RTOL[dtype], atol=0)


def test_qk_rms_norm_refuses_a_weight_or_head_split_it_cannot_apply():
    qk, weight = torch.randn(3, 6, 64), torch.ones(2, 64)
    with pytest.raises(ValueError, match=r"weight must be \[2, head_dim\]"):
        qk_rms_norm(qk, torch.ones(64), 4, 1e-6, backend="triton")
    for heads in (0, 6):
        with pytest.raises(ValueError, match="q heads first"):
            qk_rms_norm(qk, weight, heads, 1e-6, backend="triton")
    with pytest.raises(ValueError, match="weight shape"):
        qk_rms_norm(qk, torch.ones(2, 32), 4, 1e-6, backend="triton")


# ---------------------------------------------------------------------------------------------- silu_and_mul


def silu_and_mul_fp64(x: torch.Tensor) -> torch.Tensor:
    """silu in fp64, rounded to the dtype where torch rounds: after silu and after the product."""
    inter = x.shape[1] // 2
    gate, up = x[:, :inter].double(), x[:, inter:].double()
    act = (gate / (1 + torch.exp(-gate))).to(x.dtype).double()
    return (act * up).to(x.dtype)


@pytest.mark.parametrize("inter", [64, 96, 4100])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_silu_and_mul(dtype, inter):
    gen = torch.Generator().manual_seed(inter)
    num_tokens = 2 if inter > 1000 else 7
    x = (torch.randn(num_tokens, 2 * inter + 5, generator=gen) * 4).to(dtype)[:, : 2 * inter]
    gate, up = x[:, :inter], x[:, inter:]
    actual = silu_and_mul(x, backend="triton")
    assert actual.shape == (num_tokens, inter) and actual.dtype == dtype and actual.is_contiguous()
    # silu of a very negative gate is subnormal in the dtype, where one ulp is a large relative step
    info = torch.finfo(dtype)
    close = dict(rtol=2 * RTOL[dtype], atol=info.tiny * info.eps * up.abs().max().item())
    torch.testing.assert_close(actual, silu_and_mul_reference(x), **close)
    torch.testing.assert_close(actual, torch.nn.functional.silu(gate) * up, **close)
    torch.testing.assert_close(actual, silu_and_mul_fp64(x), **close)


# ---------------------------------------------------------------------------------------------- impl & errors


def test_empty_batch_and_auto_on_cpu_use_reference_semantics():
    cos, sin = rotary_tables(64)
    q, k = torch.empty(0, 4, 64), torch.empty(0, 2, 64)
    rotate(q, k, torch.empty(0, dtype=torch.int64), cos, sin)
    assert rms_norm(torch.empty(0, 64), torch.ones(64), 1e-6, backend="triton").shape == (0, 64)
    out, summed = rms_norm(torch.empty(0, 64), torch.ones(64), 1e-6, torch.empty(0, 64), backend="triton")
    assert out.shape == summed.shape == (0, 64)
    assert silu_and_mul(torch.empty(0, 128), backend="triton").shape == (0, 64)

    x = torch.randn(3, 64, dtype=torch.bfloat16)
    weight = torch.rand(64, dtype=torch.bfloat16)
    assert_bit_equal(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs a GPU"):
        silu_and_mul(torch.randn(2, 8), backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        silu_and_mul(torch.randn(2, 8), backend="cuda")


def bad_calls(impl):
    """(what is wrong, the call, the expected message)."""
    cos, sin = rotary_tables(64)
    pos = torch.zeros(3, dtype=torch.int64)
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    x, w = torch.randn(3, 64), torch.ones(64)

    def rotary(q=q, k=k, pos=pos, cos=cos, sin=sin):
        return lambda: rotate(q, k, pos, cos, sin, backend=impl)

    def norm(x=x, w=w, residual=None):
        return lambda: rms_norm(x, w, 1e-6, residual, backend=impl)

    def silu(x):
        return lambda: silu_and_mul(x, backend=impl)

    return [
        ("odd head_dim", rotary(q[..., :63], k[..., :63], cos=cos[:, :63], sin=sin[:, :63]), "even head_dim"),
        ("head_dim mismatch", rotary(k=k[..., :32]), "same even head_dim"),
        ("q/k dtype", rotary(k=k.half()), "k dtype"),
        ("int32 positions", rotary(pos=pos.int()), "positions must be int64"),
        ("positions length", rotary(pos=pos[:2]), "positions must be int64"),
        ("bf16 table", rotary(cos=cos.bfloat16()), "cos must be an fp32"),
        ("table width", rotary(sin=sin[:, :32]), "sin must be an fp32"),
        ("strided last dim", rotary(q=torch.randn(3, 64, 4).transpose(1, 2)), "contiguous last dim"),
        ("int q", rotary(q=q.int(), k=k.int()), "q dtype must be"),
        ("weight size", norm(w=torch.ones(32)), "weight shape"),
        ("weight dtype", norm(w=w.half()), "weight must match"),
        ("residual shape", norm(residual=torch.randn(3, 32)), "residual shape"),
        ("residual dtype", norm(residual=x.half()), "residual must match"),
        ("x 1-d", norm(x=x[0]), "x must be"),
        ("x strided last dim", norm(x=torch.randn(64, 3).t()), "contiguous last dim"),
        ("silu odd width", silu(torch.randn(3, 9)), r"2 \* intermediate"),
        ("silu 3-d", silu(torch.randn(3, 2, 8)), r"2 \* intermediate"),
        ("silu dtype", silu(torch.randn(3, 8).double()), "x dtype must be"),
    ]


@pytest.mark.parametrize("impl", ["torch", "triton", "auto"])
def test_bad_arguments_raise_value_error(impl):
    """The checks run before the impl switch: every impl refuses the same calls with the same message."""
    for what, call, message in bad_calls(impl):
        with pytest.raises(ValueError, match=message):
            call()
            pytest.fail(f"no error for {what}")
