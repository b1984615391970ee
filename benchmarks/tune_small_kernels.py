"""Launch settings of the fused KV write at decode shapes (needs a GPU): its tile and warps.

    python benchmarks/tune_small_kernels.py [--out tune_small_kernels.json]

At a decode step the write moves little data, so its time is mostly how well its programs spread over the GPU
(nano-vllm's Qwen3-0.6B run: the FP8 KV write 6 us a layer, for 256 tokens). A launch setting may only change the
time: every setting is checked against the default launch, byte for byte, and a setting that differs is reported
and never chosen. The default launch is also timed at scales 1.0 (a power of two: the quantization multiplies by
the reciprocal, `cache_write.divide_rn`) beside the tuned scales 0.37 and 3.0 (it divides). (The decode
attention's merge warps, `REDUCE_WARPS`, were tuned by this script's earlier version: git history.)
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kv_write import bench_gpu_ms  # noqa: E402
from benchmarks.provenance import write_result  # noqa: E402
from miniserve.kernels.cache_write import reshape_and_cache_triton  # noqa: E402

# KV writes: (tokens, KV heads, head_dim) of a decode step: batch 1 and 64 of Llama-3.2-1B, nano's 256 of
# Qwen3-0.6B, and a prompt chunk
WRITES = [(1, 8, 64), (64, 8, 64), (256, 8, 128), (8192, 8, 128)]
BLOCK_SIZE = 16


def tune_kv_write(
    device, tokens: int, heads: int, dim: int, cache_dtype: torch.dtype, scales=(0.37, 3.0), only_default=False
) -> list[dict]:
    """Every (tile, warps) setting's time and bytes against the default's; only_default: the default alone."""
    key = torch.randn(tokens, heads, dim, device=device, dtype=torch.bfloat16) * 4
    value = torch.randn_like(key)
    num_blocks = 2 * (-(-tokens // BLOCK_SIZE)) + 1
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:tokens]
    fp8 = cache_dtype.itemsize == 1
    shape = (num_blocks, BLOCK_SIZE, heads, dim)
    kc = torch.zeros(shape, dtype=torch.uint8 if fp8 else cache_dtype, device=device).view(cache_dtype)
    vc = torch.zeros_like(kc)
    k_scale, v_scale = (torch.tensor([s], device=device) for s in scales)

    def write(tile: int | None, warps: int):
        kc.zero_(), vc.zero_()
        reshape_and_cache_triton(key, value, kc, vc, slots, k_scale, v_scale, tile, warps)
        return kc.view(torch.uint8 if fp8 else cache_dtype).clone(), vc.view(
            torch.uint8 if fp8 else cache_dtype
        ).clone()

    want = write(None, 4)
    rows = []
    settings = [(None, 4)] if only_default else itertools.product((None, 256, 512, 1024, 2048, 4096), (1, 2, 4, 8))
    for tile, warps in settings:
        got = write(tile, warps)
        same = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        us = 1e3 * bench_gpu_ms(
            lambda: reshape_and_cache_triton(key, value, kc, vc, slots, k_scale, v_scale, tile, warps)  # noqa: B023
        )
        rows.append(dict(tile_elements=tile or "default", num_warps=warps, us=us, same_bytes=same))
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    result: dict = {"kv_write": []}
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
        # power-of-two scales (1.0, the default) multiply by the reciprocal instead of dividing: same bytes
        case["default_us_scales_1_1"] = tune_kv_write(device, tokens, heads, dim, cache, (1.0, 1.0), True)[0]["us"]
        print(f"   scales 1.0: {case['default_us_scales_1_1']:6.2f} us", flush=True)
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
