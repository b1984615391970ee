"""Benchmark paged decode attention: achieved KV-read bandwidth vs the GPU's peak, and vs torch SDPA on the
same K/V gathered into contiguous bf16 tensors (the best case for a dense kernel: no paging, no dequantizing).

Shape: 32 query heads, 8 KV heads, head_dim 128, block_size 16, bf16 queries, fp8 (e4m3fn) or bf16 caches.
SDPA gets the GQA group folded into its query length (q [B, 8, 4, 128] over K/V [B, 8, ctx, 128]), which is
the same computation and lets its flash kernel read K/V once.
Usage: python benchmarks/bench_decode_attention.py   (needs a GPU)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kv_write import bench_gpu_ms, import_kernels  # noqa: E402

BATCHES = (1, 16, 64, 256)
CONTEXTS = (512, 4096, 32768)
Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
NOMINAL_PEAK_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2039, "H100 NVL": 3900, "H200": 4800, "H20": 4000}


def nominal_peak_gbs(name: str) -> float | None:
    """Datasheet HBM bandwidth for the GPUs this was tuned on (None when unknown)."""
    for key, gbs in NOMINAL_PEAK_GBS.items():
        if key in name:
            return float(gbs)
    return None


def make_decode_batch(
    device, batch: int, context: int, cache_dtype: torch.dtype, seed: int = 0, heads=(Q_HEADS, KV_HEADS, HEAD_DIM)
):
    """Full-length sequences whose pages are shuffled over the pool, as after a long-running server;
    `heads` = (query heads, KV heads, head_dim)."""
    kernels = import_kernels()
    q_heads, kv_heads, head_dim = heads
    g = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    if kernels.is_fp8(cache_dtype):  # random finite codes in [2^-3, 2^4), generated directly as bytes
        kc = torch.randint(0x20, 0x58, shape, dtype=torch.uint8, device=device, generator=g).view(cache_dtype)
        vc = torch.randint(0x20, 0x58, shape, dtype=torch.uint8, device=device, generator=g).view(cache_dtype)
    else:
        kc = torch.randn(shape, dtype=cache_dtype, device=device, generator=g)
        vc = torch.randn(shape, dtype=cache_dtype, device=device, generator=g)
    block_tables = torch.randperm(num_blocks, device=device, generator=g).view(batch, blocks_per_seq).int()
    meta = kernels.AttentionMetadata(
        slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        block_tables=block_tables,
        max_query_len=1,
        max_seq_len=context,
    )
    q = torch.randn(batch, q_heads, head_dim, dtype=torch.bfloat16, device=device, generator=g)
    scales = torch.tensor([0.05], device=device), torch.tensor([0.02], device=device)
    return q, kc, vc, meta, scales


def gather_contiguous(cache, block_tables, scale, is_fp8: bool, chunk: int = 8) -> torch.Tensor:
    """[num_blocks, bs, Hkv, D] pages -> contiguous bf16 [B, Hkv, ctx, D] (dequantized for fp8), a few
    sequences at a time so that the temporaries stay small."""
    batch = block_tables.shape[0]
    out = torch.empty(batch, KV_HEADS, block_tables.shape[1] * BLOCK_SIZE, HEAD_DIM, dtype=torch.bfloat16,
                      device=cache.device)  # fmt: skip
    for i in range(0, batch, chunk):
        x = cache[block_tables[i : i + chunk].long()].flatten(1, 2).to(torch.bfloat16)
        x = x * scale.to(torch.bfloat16) if is_fp8 else x
        out[i : i + chunk] = x.transpose(1, 2)
    return out


def bench_decode(
    device,
    batches=BATCHES,
    contexts=CONTEXTS,
    caches=(torch.float8_e4m3fn, torch.bfloat16),
    with_sdpa: bool = True,
    **kernel_kwargs,
):
    import_kernels()
    rows = []
    for cache_dtype in caches:
        for batch in batches:
            for context in contexts:
                rows.append(bench_one_decode(device, batch, context, cache_dtype, with_sdpa, kernel_kwargs))
                torch.cuda.empty_cache()
    return rows


def bench_one_decode(device, batch: int, context: int, cache_dtype, with_sdpa: bool, kernel_kwargs: dict) -> dict:
    from miniserve.kernels.decode_attention import choose_num_splits, decode_attention

    elem = cache_dtype.itemsize
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * elem
    sdpa_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
    free = torch.cuda.mem_get_info(device)[0]
    row = dict(cache=str(cache_dtype)[6:], batch=batch, context=context, kv_gb=kv_bytes / 1e9)
    if kv_bytes > 0.45 * free:
        return {**row, "skipped": "does not fit"}
    q, kc, vc, meta, (ks, vs) = make_decode_batch(device, batch, context, cache_dtype)
    sm_scale = 1 / math.sqrt(HEAD_DIM)

    def paged():
        return decode_attention(q, kc, vc, meta, ks, vs, sm_scale, **kernel_kwargs)

    ms = bench_gpu_ms(paged)
    splits = kernel_kwargs.get("num_splits") or choose_num_splits(meta.max_seq_len)
    row.update(splits=splits, us=ms * 1e3, gbs=kv_bytes / ms / 1e6)
    if with_sdpa and kv_bytes + sdpa_bytes < 0.8 * free:
        k = gather_contiguous(kc, meta.block_tables, ks, elem == 1)
        v = gather_contiguous(vc, meta.block_tables, vs, elem == 1)
        qs = q.view(batch, KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM)

        def dense():
            return F.scaled_dot_product_attention(qs, k, v, scale=sm_scale)

        err = (paged().float() - dense().reshape(q.shape).float()).abs().max().item()
        sdpa_ms = bench_gpu_ms(dense)
        row.update(sdpa_us=sdpa_ms * 1e3, sdpa_gbs=sdpa_bytes / sdpa_ms / 1e6, max_abs_diff_vs_sdpa=err)
    return row


def tune_decode(device) -> list[dict]:
    """A small sweep of launch parameters at the target shape (bs64 x 4k) and of split counts at bs1 x 32k."""
    rows = []
    for block_n, num_warps, num_stages in (
        (32, 4, 2),
        (64, 4, 2),
        (64, 4, 3),
        (128, 4, 2),
        (128, 8, 2),
        (64, 8, 3),
    ):
        cfg = dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages)
        for r in bench_decode(device, (64,), (4096,), with_sdpa=False, **cfg):
            rows.append({**cfg, **r})
    fp8 = (torch.float8_e4m3fn,)
    for r in bench_decode(device, (64,), (4096,), fp8, with_sdpa=False, fp8_decode="bits"):
        rows.append({"fp8_decode": "bits", **r})
    for splits in (1, 4, 16, 64):
        for batch, context in ((1, 32768), (64, 4096)):
            for r in bench_decode(device, (batch,), (context,), fp8, with_sdpa=False, num_splits=splits):
                rows.append({"num_splits": splits, **r})
    return rows


def main() -> None:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    print(f"{name}: nominal peak {nominal_peak_gbs(name)} GB/s")
    for r in bench_decode(device):
        print(r)


if __name__ == "__main__":
    main()
