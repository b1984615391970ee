"""Paged attention: the torch reference against dense fp64 SDPA, and the Triton decode/extend kernels against
the reference (CPU interpreter, TRITON_INTERPRET=1 set before Triton is imported)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fp8_oracle import all_code_values, quantize_bytes  # noqa: E402

from miniserve.config import resolve_kv_cache_dtype  # noqa: E402
from miniserve.kernels import (  # noqa: E402
    AttentionMetadata,
    paged_attention,
    reshape_and_cache,
    resolve_backend,
)
from miniserve.kernels.fp8 import is_fp8  # noqa: E402


@dataclass
class Batch:
    q: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    meta: AttentionMetadata
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    keys: list  # per sequence [S, Hkv, D] fp32 values as written (before quantization)
    values: list


def make_batch(
    seqs,
    block_size,
    num_q_heads,
    num_kv_heads,
    head_dim,
    cache_dtype,
    q_dtype,
    seed=0,
    k_scale=0.05,
    v_scale=0.02,
) -> Batch:
    """`seqs` = [(seq_len, q_len)]: pages scattered over a shuffled pool, written with the reference."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    pool = torch.randperm(num_blocks, generator=g)
    width = max(blocks_per_seq) + 1
    block_tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=g).to(cache_dtype)  # stale garbage in unused slots
    value_cache = torch.randn(cache_shape, generator=g).to(cache_dtype)
    ks, vs = torch.tensor([k_scale]), torch.tensor([v_scale])
    keys, values, used = [], [], 0
    for i, (seq_len, _) in enumerate(seqs):
        table = pool[used : used + blocks_per_seq[i]]
        used += blocks_per_seq[i]
        block_tables[i, : len(table)] = table.int()
        pos = torch.arange(seq_len)
        slots = table[pos // block_size].long() * block_size + pos % block_size
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=g) * 2
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=g)
        reshape_and_cache(k, v, key_cache, value_cache, slots, ks, vs, backend="torch")
        keys.append(k)
        values.append(v)
    q_lens = [ql for _, ql in seqs]
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=g).to(q_dtype)
    starts = torch.tensor([0, *q_lens]).cumsum(0).int()
    meta = AttentionMetadata(
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64),
        query_start_loc=starts,
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32),
        block_tables=block_tables,
        max_query_len=max(q_lens),
        max_seq_len=max(s for s, _ in seqs),
    )
    return Batch(q, key_cache, value_cache, meta, ks, vs, keys, values)


def stored_values(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """What the cache holds for x, as fp64: FP8 round trip through the cache dtype, or a plain cast."""
    if is_fp8(cache_dtype):  # the independent oracle's codes and code values
        codes = torch.from_numpy(quantize_bytes(x, float(scale), cache_dtype)).long()
        return torch.from_numpy(all_code_values(cache_dtype))[codes] * scale.double()
    return x.to(cache_dtype).double()


def dense_oracle(b: Batch, sm_scale: float) -> torch.Tensor:
    """fp64 SDPA over contiguous per-sequence K/V with an explicit causal mask."""
    out = torch.empty(b.q.shape, dtype=torch.float64)
    starts = b.meta.query_start_loc.tolist()
    group = b.q.shape[1] // b.key_cache.shape[2]
    for i, seq_len in enumerate(b.meta.seq_lens.tolist()):
        q = b.q[starts[i] : starts[i + 1]].double().transpose(0, 1)  # [Hq, L, D]
        k = stored_values(b.keys[i], b.key_cache.dtype, b.k_scale).repeat_interleave(group, 1).transpose(0, 1)
        v = stored_values(b.values[i], b.value_cache.dtype, b.v_scale).repeat_interleave(group, 1).transpose(0, 1)
        q_len = q.shape[1]
        mask = torch.arange(seq_len)[None, :] <= (seq_len - q_len + torch.arange(q_len))[:, None]
        out[starts[i] : starts[i + 1]] = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=sm_scale
        ).transpose(0, 1)
    return out


def tolerance(q_dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[q_dtype]


def dtype_id(x):
    return str(x)[6:] if isinstance(x, torch.dtype) else None


CACHES = [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.bfloat16, torch.float32]
DECODE_SEQS = [(1, 1), (7, 1), (33, 1), (64, 1), (130, 1)]
EXTEND_SEQS = [(5, 5), (40, 3), (17, 1), (70, 33), (9, 4)]  # prefills, cached prefixes, a lone decode row


@pytest.mark.parametrize("seqs", [DECODE_SEQS, EXTEND_SEQS], ids=["decode", "extend"])
@pytest.mark.parametrize("cache_dtype", CACHES, ids=dtype_id)
@pytest.mark.parametrize("group", [1, 4])
def test_reference_matches_dense_sdpa(seqs, cache_dtype, group):
    b = make_batch(seqs, 8, 2 * group, 2, 32, cache_dtype, torch.float32)
    sm_scale = 1 / math.sqrt(32)
    got = paged_attention(b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, sm_scale, backend="torch")
    assert got.dtype == torch.float32 and got.shape == b.q.shape
    torch.testing.assert_close(got.double(), dense_oracle(b, sm_scale), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("seqs", [DECODE_SEQS, EXTEND_SEQS], ids=["decode", "extend"])
@pytest.mark.parametrize("cache_dtype", CACHES, ids=dtype_id)
def test_reference_ignores_nan_in_slots_no_sequence_holds(seqs, cache_dtype):
    """Slots past a sequence's end (its last page's stale tail, the pages a padded block table points at: another
    request's, or freed ones) may hold anything, NaN included (an earlier request's overflow): the answer is the
    dense oracle's, as if they held nothing. The decode reference read them padded to the longest context, and
    0 x NaN poisoned every sequence of the batch."""
    b = make_batch(seqs, 8, 4, 2, 32, cache_dtype, torch.float32)
    held = torch.zeros(b.key_cache.shape[0] * 8, dtype=torch.bool)
    for table, seq_len in zip(b.meta.block_tables.long(), b.meta.seq_lens.tolist()):
        pos = torch.arange(seq_len)
        held[table[pos // 8] * 8 + pos % 8] = True
    for cache in (b.key_cache, b.value_cache):  # (through fp32, which holds every code's value exactly)
        wide = cache.float()
        wide.view(-1, *cache.shape[2:])[~held] = float("nan")
        cache.copy_(wide.to(cache_dtype))
    got = paged_attention(b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.125, backend="torch")
    torch.testing.assert_close(got.double(), dense_oracle(b, 0.125), atol=2e-5, rtol=1e-5)


def test_reference_output_dtype_follows_q():
    b = make_batch(EXTEND_SEQS, 16, 4, 2, 64, torch.bfloat16, torch.bfloat16)
    got = paged_attention(b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.125, backend="torch")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), dense_oracle(b, 0.125), atol=1e-2, rtol=1e-2)


def test_backend_selection_and_cache_dtypes():
    cpu = torch.device("cpu")
    assert resolve_backend(cpu, "auto") == "torch"
    assert resolve_backend("cuda", "auto") == "triton"
    assert resolve_backend(cpu, "triton") == "triton"  # TRITON_INTERPRET=1 is set in this module
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            resolve_backend(cpu, "triton")
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend(cpu, "flash")
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16, cpu) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.float16, cpu) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("fp8_e4m3fnuz", torch.float16, cpu) == torch.float8_e4m3fnuz
    assert resolve_kv_cache_dtype("float32", torch.bfloat16, cpu) == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        resolve_kv_cache_dtype("int8", torch.bfloat16, cpu)


# ---------------------------------------------------------------- Triton kernels (interpreter) vs reference


def check_triton(b: Batch, sm_scale: float = 0.3):
    want = paged_attention(b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, sm_scale, backend="torch")
    got = paged_attention(b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, sm_scale, backend="triton")
    assert got.dtype == b.q.dtype and got.shape == b.q.shape
    torch.testing.assert_close(got.float(), want.float(), **tolerance(b.q.dtype))


# Each cache dtype meets every block size and every GQA ratio once (a covering design keeps CI fast).
LAYOUTS = [(1, 2), (8, 4), (16, 1)]  # (block_size, q heads per KV head)


@pytest.mark.parametrize("block_size,group", LAYOUTS)
@pytest.mark.parametrize("cache_dtype", CACHES, ids=dtype_id)
def test_decode_kernel(block_size, group, cache_dtype):
    b = make_batch(DECODE_SEQS, block_size, 2 * group, 2, 32, cache_dtype, torch.float32, seed=block_size + group)
    check_triton(b)


@pytest.mark.parametrize("block_size,group", LAYOUTS)
@pytest.mark.parametrize("cache_dtype", CACHES, ids=dtype_id)
def test_extend_kernel(block_size, group, cache_dtype):
    b = make_batch(EXTEND_SEQS, block_size, 2 * group, 2, 32, cache_dtype, torch.float32, seed=block_size * group)
    check_triton(b)


@pytest.mark.parametrize("head_dim", [80, 128])
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.bfloat16], ids=dtype_id)
def test_kernels_bf16_queries_and_odd_head_dims(head_dim, cache_dtype):
    for seqs in (DECODE_SEQS, EXTEND_SEQS):
        check_triton(make_batch(seqs, 16, 4, 1, head_dim, cache_dtype, torch.bfloat16, seed=head_dim))


def test_fp8_cache_with_queries_beyond_fp16_range():
    """Against FP8 caches the dots run in fp16; bf16 queries larger than fp16's max are rescaled first."""
    b = make_batch(EXTEND_SEQS, 8, 4, 2, 32, torch.float8_e4m3fn, torch.bfloat16, seed=5, k_scale=1e-5)
    b.q = (b.q.float() * 3e5).to(torch.bfloat16)
    assert b.q.abs().max() > 65504
    check_triton(b)  # extend
    b.meta.query_start_loc = torch.arange(len(EXTEND_SEQS) + 1, dtype=torch.int32)
    b.meta.max_query_len = 1
    b.q = b.q[: len(EXTEND_SEQS)]
    check_triton(b)  # decode: one query per sequence at the end of its context


@pytest.mark.parametrize("num_splits", [None, 8])
def test_decode_kernel_split_kv(num_splits):
    """Long and short contexts split over several programs (flash-decoding), empty splits included, merged by
    the reduce stage; None = the launcher's own choice (splits > 1 here too)."""
    from miniserve.kernels.decode_attention import choose_num_splits, decode_attention

    b = make_batch([(1000, 1), (3, 1), (517, 1)], 16, 8, 2, 64, torch.float8_e4m3fn, torch.float32, seed=3)
    assert choose_num_splits(b.meta.max_seq_len) > 1
    want = paged_attention(b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3, backend="torch")
    got = decode_attention(b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3, num_splits=num_splits)
    torch.testing.assert_close(got, want, **tolerance(torch.float32))


@pytest.mark.parametrize("split_tokens", [64, 128, 1024])
def test_decode_kernel_split_sizes(split_tokens):
    """The split sizes decode_splits="by-batch" picks (64 tokens: many splits of one tile; 1024: one split for
    every context here, no merge) against the reference, through paged_attention's by-batch path as well."""
    from miniserve.kernels.decode_attention import decode_attention

    b = make_batch([(1000, 1), (3, 1), (129, 1), (64, 1)], 16, 8, 2, 64, torch.bfloat16, torch.float32, seed=4)
    args = (b.q, b.key_cache, b.value_cache, b.meta, b.k_scale, b.v_scale, 0.3)
    want = paged_attention(*args, backend="torch")
    got = decode_attention(*args, split_tokens=split_tokens, block_n=64)
    torch.testing.assert_close(got, want, **tolerance(torch.float32))
    by_batch = paged_attention(*args, backend="triton", decode_splits="by-batch")  # 4 x 2 programs: 64 tokens
    torch.testing.assert_close(by_batch, want, **tolerance(torch.float32))


@pytest.mark.parametrize(
    ("num_seqs", "block_n", "want"),
    [(1, 64, 64), (1, 128, 128), (2, 64, 128), (8, 64, 128), (9, 64, 512), (127, 64, 512), (128, 64, 1024)],
)
def test_by_batch_split_sizes_follow_the_batch(num_seqs, block_n, want):
    """by-batch: 8 KV heads x num_seqs programs before splitting; each boundary and its neighbour, and never
    shorter than a KV tile. by-length: the same size at every batch."""
    from miniserve.kernels.decode_attention import SPLIT_TOKENS, split_tokens_for

    assert split_tokens_for("by-batch", num_seqs, 8, block_n) == want
    assert split_tokens_for("by-length", num_seqs, 8, block_n) == SPLIT_TOKENS
    with pytest.raises(ValueError, match="decode_splits"):
        split_tokens_for("by-size", num_seqs, 8, block_n)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_decode_is_batch_invariant_and_verification_matches_it_bit_for_bit(cache_dtype):
    """A query's decode output does not depend on its batch or on the grid's split count (eager vs CUDA graph);
    and a batch of a few new tokens per sequence (speculative verification) gives each token exactly its plain
    decode result. This is what keeps greedy speculative decoding identical to plain decoding."""
    from miniserve.kernels.decode_attention import decode_attention

    seqs = [(300, 1), (40, 1), (520, 1), (7, 1)]  # 520: two splits of SPLIT_TOKENS (512), the second of 8
    b = make_batch(seqs, 16, 8, 2, 64, cache_dtype, torch.float32, seed=11)
    args = (b.key_cache, b.value_cache)
    full = decode_attention(b.q, *args, b.meta, b.k_scale, b.v_scale, 0.3)
    wide = decode_attention(b.q, *args, b.meta, b.k_scale, b.v_scale, 0.3, num_splits=16)  # a graph's grid
    assert torch.equal(full, wide)
    for i in range(len(seqs)):  # each sequence alone
        meta = AttentionMetadata(
            b.meta.slot_mapping[i : i + 1],
            torch.tensor([0, 1], dtype=torch.int32),
            b.meta.seq_lens[i : i + 1],
            b.meta.block_tables[i : i + 1],
            1,
            seqs[i][0],
        )
        alone = decode_attention(b.q[i : i + 1], *args, meta, b.k_scale, b.v_scale, 0.3)
        assert torch.equal(alone, full[i : i + 1])
    # verification: the last 3 positions of each sequence as one multi-token batch, run as decode queries
    v = make_batch([(s, 3) for s, _ in seqs], 16, 8, 2, 64, cache_dtype, torch.float32, seed=11)
    queries = v.meta.as_decode_queries()
    assert queries.is_decode and queries.seq_lens.tolist() == [s - 2 + j for s, _ in seqs for j in range(3)]
    causal = paged_attention(v.q, v.key_cache, v.value_cache, v.meta, v.k_scale, v.v_scale, 0.3, "torch")
    as_queries = paged_attention(v.q, v.key_cache, v.value_cache, queries, v.k_scale, v.v_scale, 0.3, "torch")
    torch.testing.assert_close(as_queries, causal, rtol=1e-5, atol=1e-5)  # the same attention, described per token
    together = paged_attention(v.q, v.key_cache, v.value_cache, queries, v.k_scale, v.v_scale, 0.3, "triton")
    for t in range(v.q.shape[0]):
        i, j = divmod(t, 3)
        meta = AttentionMetadata(
            v.meta.slot_mapping[t : t + 1],
            torch.tensor([0, 1], dtype=torch.int32),
            torch.tensor([seqs[i][0] - 2 + j], dtype=torch.int32),
            v.meta.block_tables[i : i + 1],
            1,
            seqs[i][0],
        )
        single = decode_attention(v.q[t : t + 1], v.key_cache, v.value_cache, meta, v.k_scale, v.v_scale, 0.3)
        assert torch.equal(together[t : t + 1], single)


@pytest.mark.parametrize(
    ("arch", "want"),
    [
        ("gfx942:sramecc+:xnack-", torch.float8_e4m3fnuz),
        ("gfx950", torch.float8_e4m3fn),
        ("gfx1100", torch.float8_e4m3fn),
    ],
)
def test_fp8_resolves_to_the_rocm_device_flavour(monkeypatch, arch, want):
    """On ROCm, kv_cache_dtype="fp8" means e4m3fnuz on MI300 (gfx94x) and e4m3fn elsewhere."""
    import types

    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(gcnArchName=arch))
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16, torch.device("cuda", 0)) == want
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.bfloat16, torch.device("cuda", 0)) == want
