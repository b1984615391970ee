"""Launch settings of the small per-layer kernels at decode shapes (needs a GPU): the fused KV write's tile and
warps, and the decode attention's stage-2 (split merge) warps.

    python benchmarks/tune_small_kernels.py [--out tune_small_kernels.json]

At a decode step these kernels move little data, so their time is mostly how well their programs spread over the
GPU (nano-vllm's Qwen3-0.6B run: the FP8 KV write 6 us and the split merge 7 us a layer, for 256 tokens). A launch
setting may only change the time: every setting is checked against the default launch, byte for byte (KV write)
and bit for bit (attention output), and a setting that differs is reported and never chosen.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode_attention import make_decode_batch  # noqa: E402
from benchmarks.bench_kv_write import bench_gpu_ms  # noqa: E402
from benchmarks.provenance import write_result  # noqa: E402
from miniserve.kernels.cache_write import reshape_and_cache_triton  # noqa: E402
from miniserve.kernels.decode_attention import REDUCE_WARPS, decode_attention  # noqa: E402

# KV writes: (tokens, KV heads, head_dim) of a decode step: batch 1 and 64 of Llama-3.2-1B, nano's 256 of
# Qwen3-0.6B, and a prompt chunk
WRITES = [(1, 8, 64), (64, 8, 64), (256, 8, 128), (8192, 8, 128)]
# decode attention: name -> (batch, longest context, (q heads, KV heads, head_dim)); contexts drawn in [100, longest]
DECODES = {
    "llama-1b b1 ctx640": (1, 640, (32, 8, 64)),
    "llama-1b b64 ctx640": (64, 640, (32, 8, 64)),
    "qwen3-0.6b b256 ctx100-2048": (256, 2048, (16, 8, 128)),
    "llama-8b b64 ctx4096": (64, 4096, (32, 8, 128)),
}
BLOCK_SIZE = 16


def tune_kv_write(device, tokens: int, heads: int, dim: int, cache_dtype: torch.dtype) -> list[dict]:
    key = torch.randn(tokens, heads, dim, device=device, dtype=torch.bfloat16) * 4
    value = torch.randn_like(key)
    num_blocks = 2 * (-(-tokens // BLOCK_SIZE)) + 1
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:tokens]
    fp8 = cache_dtype.itemsize == 1
    shape = (num_blocks, BLOCK_SIZE, heads, dim)
    kc = torch.zeros(shape, dtype=torch.uint8 if fp8 else cache_dtype, device=device).view(cache_dtype)
    vc = torch.zeros_like(kc)
    k_scale, v_scale = torch.tensor([0.37], device=device), torch.tensor([3.0], device=device)

    def write(tile: int | None, warps: int):
        kc.zero_(), vc.zero_()
        reshape_and_cache_triton(key, value, kc, vc, slots, k_scale, v_scale, tile, warps)
        return kc.view(torch.uint8 if fp8 else cache_dtype).clone(), vc.view(
            torch.uint8 if fp8 else cache_dtype
        ).clone()

    want = write(None, 4)
    rows = []
    for tile, warps in itertools.product((None, 256, 512, 1024, 2048, 4096), (1, 2, 4, 8)):
        got = write(tile, warps)
        same = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        us = 1e3 * bench_gpu_ms(
            lambda: reshape_and_cache_triton(key, value, kc, vc, slots, k_scale, v_scale, tile, warps)  # noqa: B023
        )
        rows.append(dict(tile_elements=tile or "default", num_warps=warps, us=us, same_bytes=same))
    return rows


def tune_reduce(device, batch: int, context: int, heads: tuple, cache_dtype: torch.dtype) -> list[dict]:
    q, kc, vc, meta, (ks, vs) = make_decode_batch(device, batch, context, cache_dtype, heads=heads)
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(100, context + 1, (batch,), generator=g) if batch > 1 else torch.tensor([context])
    meta.seq_lens.copy_(lens.to(torch.int32))
    sm = heads[2] ** -0.5
    want = decode_attention(q, kc, vc, meta, ks, vs, sm)
    rows = []
    for warps in (1, 2, 4, 8):
        got = decode_attention(q, kc, vc, meta, ks, vs, sm, reduce_warps=warps)
        us = 1e3 * bench_gpu_ms(lambda: decode_attention(q, kc, vc, meta, ks, vs, sm, reduce_warps=warps))  # noqa: B023
        rows.append(dict(reduce_warps=warps, us=us, identical=bool(torch.equal(got, want))))
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    result: dict = {"default_reduce_warps": REDUCE_WARPS, "kv_write": [], "reduce": []}
    caches = (torch.bfloat16, torch.float8_e4m3fn)
    for (tokens, heads, dim), cache in itertools.product(WRITES, caches):
        rows = tune_kv_write(device, tokens, heads, dim, cache)
        case = dict(tokens=tokens, kv_heads=heads, head_dim=dim, cache=str(cache)[6:], rows=rows)
        result["kv_write"].append(case)
        best = min((r for r in rows if r["same_bytes"]), key=lambda r: r["us"])
        default = next(r for r in rows if r["tile_elements"] == "default" and r["num_warps"] == 4)
        print(f"kv write {tokens:5d} x {heads} x {dim} {case['cache']:14s} default {default['us']:6.2f} us, best "
              f"{best['us']:6.2f} us (tile {best['tile_elements']}, {best['num_warps']} warps); "
              f"differing: {[r for r in rows if not r['same_bytes']]}", flush=True)  # fmt: skip
    for (name, (batch, context, heads)), cache in itertools.product(
        DECODES.items(), (torch.bfloat16, torch.float8_e4m3fn)
    ):
        rows = tune_reduce(device, batch, context, heads, cache)
        result["reduce"].append(dict(case=name, cache=str(cache)[6:], rows=rows))
        print(f"decode {name:28s} {str(cache)[6:]:14s} " + "  ".join(
            f"w{r['reduce_warps']}: {r['us']:7.2f} us{'' if r['identical'] else ' (differs)'}" for r in rows
        ), flush=True)  # fmt: skip
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
