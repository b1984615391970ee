"""Sweep the paged decode-attention kernel's launch knobs at real model shapes (needs a GPU).

    python benchmarks/tune_decode_attention.py [--quick] [--out tune.json]
    python benchmarks/tune_decode_attention.py --fp8-variants [--out fp8_variants.json]   # FP8_VARIANTS only
    python benchmarks/tune_decode_attention.py --small-batches [--out small.json]        # batch 1..8 launches

For each shape (batch, context, query heads, KV heads, head_dim) and cache dtype (bf16, fp8 with the hardware
e4m3 -> fp16 conversion, fp8 with the bit-field decode) it times every (BLOCK_N, num_warps, num_stages,
split_tokens) combination with CUDA-graph replay (GPU time only, median) and reports achieved KV bandwidth.
It also times the grid that a CUDA graph captures (64 splits, for the longest possible context) against the
eager grid, which must cost the same now that empty splits do nothing. Results: the best config per case.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode_attention import make_decode_batch  # noqa: E402
from benchmarks.bench_kv_write import bench_gpu_ms  # noqa: E402
from benchmarks.provenance import write_result  # noqa: E402
from miniserve.kernels.decode_attention import decode_attention  # noqa: E402

# name: (batch, context, q heads, kv heads, head_dim)
SHAPES = {
    "llama-1b b64 ctx640": (64, 640, 32, 8, 64),
    "llama-1b b128 ctx576": (128, 576, 32, 8, 64),  # the batch sweep's largest batches (prompt 512, 64 new)
    "llama-1b b256 ctx576": (256, 576, 32, 8, 64),
    "qwen3-0.6b b256 ctx1100": (256, 1100, 16, 8, 128),
    "llama-8b b64 ctx4096": (64, 4096, 32, 8, 128),
    "llama-8b b8 ctx4096": (8, 4096, 32, 8, 128),
}


# The FP8 decode variants that offline compiler analysis found promising (kernel_resources.py; write-up in
# benchmarks/results/decode_attention_fp8_registers.md), measured by --fp8-variants. "staged" and the "hw" ones use
# the default's tiles and conversion instruction; block_n=64 changes the accumulation order of every FP8 query
# (decode and extend share kv_block_n), so it needs this measurement first.
# name: decode_attention keyword arguments (the tests run every one against the torch reference)
FP8_VARIANTS = {
    "default": dict(fp8_decode="auto"),
    "uncapped": dict(fp8_decode="hw", maxnreg=0),  # the default before default_register_cap
    "staged": dict(fp8_decode="hw-staged"),
    "staged w8": dict(fp8_decode="hw-staged", num_warps=8),
    "staged bn64": dict(fp8_decode="hw-staged", block_n=64),
    "staged bn64 w8": dict(fp8_decode="hw-staged", block_n=64, num_warps=8),
    "w8": dict(fp8_decode="hw", num_warps=8),
    "bn64": dict(fp8_decode="hw", block_n=64),
    "bn64 w8": dict(fp8_decode="hw", block_n=64, num_warps=8),
    "staged s1": dict(fp8_decode="hw-staged", num_stages=1),
    # register caps at which ptxas (triton 3.6) does not spill: more resident programs, same arithmetic
    "r168": dict(fp8_decode="hw", maxnreg=168),
    "r128": dict(fp8_decode="hw", maxnreg=128),  # head_dim 64: 137 -> 127 registers, no spill, 3 -> 4 blocks/SM
    "r96": dict(fp8_decode="hw", maxnreg=96),  # head_dim 64: 80 bytes of spill, 5 blocks/SM
    "staged bn64 r80": dict(fp8_decode="hw-staged", block_n=64, maxnreg=80),
    "staged w8 r80": dict(fp8_decode="hw-staged", num_warps=8, maxnreg=80),
    "staged s1 r128": dict(fp8_decode="hw-staged", num_stages=1, maxnreg=128),  # 8 bytes of stack: 4 blocks/SM
    # head_dim 64 at short contexts (Llama-3.2-1B): a program runs 2-3 tiles, so each tile's dependent loads
    # (block table, then K/V) are barely hidden; more, smaller programs an SM, or a deeper pipeline, may hide them
    "w2": dict(fp8_decode="hw", num_warps=2),
    "s3": dict(fp8_decode="hw", num_stages=3),
    "w2 s3": dict(fp8_decode="hw", num_warps=2, num_stages=3),
    # "default" ("auto") reads V in int16 byte pairs (decode_attention.pv_by_pairs) under a register cap of 96;
    # "hw" is the default before it, V gathered byte by byte, under a cap of 128
    "hw": dict(fp8_decode="hw"),
    "pairs uncapped": dict(fp8_decode="hw-pairs", maxnreg=0),
    "pairs r128": dict(fp8_decode="hw-pairs", maxnreg=128),
    "pairs s3": dict(fp8_decode="hw-pairs", num_stages=3),
    "pairs w8": dict(fp8_decode="hw-pairs", num_warps=8),
}


def make_case(batch, ctx, hq, hkv, d, cache_dtype, seed=0):
    """A decode batch of full-length sequences over shuffled pages, and the KV bytes it reads."""
    case = make_decode_batch(torch.device("cuda"), batch, ctx, cache_dtype, seed, heads=(hq, hkv, d))
    return (*case, 2 * batch * ctx * hkv * d * case[1].element_size())


def time_config(case, fp8_decode: str = "auto", **kw) -> float:
    q, kc, vc, meta, (ks, vs), _ = case
    fn = lambda: decode_attention(q, kc, vc, meta, ks, vs, 0.1, fp8_decode=fp8_decode, **kw)  # noqa: E731
    fn()
    return bench_gpu_ms(fn)


def fp64_reference(q, kc, vc, meta, k_scale, v_scale, sm_scale: float) -> torch.Tensor:
    """Decode attention over the dequantized cache in float64, sequence by sequence: the exact answer that every
    kernel's bf16 output approximates."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    block_size, kv_heads, head_dim = kc.shape[1:]
    group = q.shape[1] // kv_heads
    for b, seq_len in enumerate(meta.seq_lens.tolist()):
        pages = meta.block_tables[b, : -(-seq_len // block_size)].long()
        k, v = (c[pages].reshape(-1, kv_heads, head_dim)[:seq_len].double() for c in (kc, vc))
        qb = q[b].double().view(kv_heads, group, head_dim)
        scores = torch.einsum("hgd,nhd->hgn", qb, k * k_scale.double()) * sm_scale
        out[b] = torch.einsum("hgn,nhd->hgd", scores.softmax(-1), v * v_scale.double()).reshape(-1, head_dim)
    return out


def fp8_variants(names: list[str] | None = None) -> list[dict]:
    """Every FP8_VARIANTS entry at every shape: GPU time, KV bandwidth, speedup over the bf16 cache at its
    default, whether its output is bit-identical to the default FP8 kernel's, and each output's distance from
    the float64 answer (max and mean absolute error: whether a variant that changes bits is any less accurate)."""
    rows = []
    for name, shp in SHAPES.items():
        bf16 = make_case(*shp, torch.bfloat16)
        bf16_us = 1e3 * time_config(bf16, "auto")
        del bf16
        case = make_case(*shp, torch.float8_e4m3fn)
        q, kc, vc, meta, (ks, vs), nbytes = case
        default = decode_attention(q, kc, vc, meta, ks, vs, 0.1)
        exact = fp64_reference(q, kc, vc, meta, ks, vs, 0.1)
        for variant, kw in FP8_VARIANTS.items():
            if names and variant not in names:
                continue
            row = {"shape": name, "variant": variant, **kw, "bf16_us": bf16_us}
            try:
                out = decode_attention(q, kc, vc, meta, ks, vs, 0.1, **kw)
                us = 1e3 * time_config(case, **kw)
            except Exception as e:  # noqa: BLE001 - out of shared memory and the like
                rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            row.update(
                us=us,
                tbs=nbytes / us / 1e6,
                speedup_vs_bf16=bf16_us / us,
                identical_to_default=bool(torch.equal(out, default)),
                max_abs_diff_to_default=(out.float() - default.float()).abs().max().item(),
                max_abs_err_fp64=(out.double() - exact).abs().max().item(),
                mean_abs_err_fp64=(out.double() - exact).abs().mean().item(),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
        del case
        torch.cuda.empty_cache()
    return rows


# batch 1..8: a handful of programs a layer, each walking its tiles one after another (latency, not bytes)
SMALL_SHAPES = {
    "llama-1b b1 ctx640": (1, 640, 32, 8, 64),
    "llama-1b b8 ctx640": (8, 640, 32, 8, 64),
    "llama-8b b1 ctx640": (1, 640, 32, 8, 128),
    "llama-8b b1 ctx4096": (1, 4096, 32, 8, 128),
}


def small_batches() -> list[dict]:
    """Pipeline depth and warps at SMALL_SHAPES (bf16 and the exact FP8 kernel), with the grid a CUDA graph
    launches (MAX_SPLITS): GPU time, and whether the output is bit-identical to the default launch's (the
    condition for choosing a launch by batch size: a sequence's result must not depend on its batch)."""
    from miniserve.kernels.decode_attention import MAX_SPLITS

    rows = []
    for (name, shp), dtype in itertools.product(SMALL_SHAPES.items(), (torch.bfloat16, torch.float8_e4m3fn)):
        case = make_case(*shp, dtype)
        q, kc, vc, meta, (ks, vs), _ = case
        default = decode_attention(q, kc, vc, meta, ks, vs, 0.1, num_splits=MAX_SPLITS)
        base_us = 1e3 * time_config(case, num_splits=MAX_SPLITS)
        for warps, stages in itertools.product((2, 4, 8), (1, 2, 3, 4)):
            kw = dict(num_splits=MAX_SPLITS, num_warps=warps, num_stages=stages)
            try:
                out = decode_attention(q, kc, vc, meta, ks, vs, 0.1, **kw)
                us = 1e3 * time_config(case, **kw)
            except Exception as e:  # noqa: BLE001 - out of shared memory and the like
                print(f"  skip {name} w{warps} s{stages}: {type(e).__name__}", flush=True)
                continue
            rows.append({"shape": name, "cache": str(dtype), "num_warps": warps, "num_stages": stages, "us": us,
                         "default_us": base_us, "speedup": base_us / us,
                         "identical_to_default": bool(torch.equal(out, default))})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        del case
    return rows


def split_sizes() -> list[dict]:
    """Tokens a split (the grid a CUDA graph launches, MAX_SPLITS) at every shape, bf16 and the exact FP8 kernel:
    fewer tokens a split means more, shorter programs (small batches wait less on each program's serial tiles)
    and more partial results to merge (large batches pay for that). Outputs differ between split sizes."""
    from miniserve.kernels.decode_attention import MAX_SPLITS

    rows = []
    shapes = {**SMALL_SHAPES, **SHAPES}
    for (name, shp), dtype in itertools.product(shapes.items(), (torch.bfloat16, torch.float8_e4m3fn)):
        case = make_case(*shp, dtype)
        base_us = 1e3 * time_config(case, num_splits=MAX_SPLITS)
        for split_tokens in (64, 128, 256, 512, 1024):
            us = 1e3 * time_config(case, num_splits=MAX_SPLITS, split_tokens=split_tokens)
            rows.append({"shape": name, "cache": str(dtype), "split_tokens": split_tokens, "us": us,
                         "default_us": base_us, "speedup": base_us / us})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        del case
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--once", default=None, help="run one shape ('name|cache') a few times, e.g. under ncu")
    ap.add_argument("--fp8-variants", action="store_true", help="time FP8_VARIANTS only (see fp8_variants)")
    ap.add_argument("--variants", nargs="+", choices=list(FP8_VARIANTS), help="--fp8-variants: these only")
    ap.add_argument("--small-batches", action="store_true", help="pipeline depth and warps at batch 1..8 only")
    ap.add_argument("--split-sizes", action="store_true", help="tokens a split, at every shape (see split_sizes)")
    args = ap.parse_args()
    if args.split_sizes:
        rows = split_sizes()
        if args.out:
            write_result(args.out, {"gpu": torch.cuda.get_device_name(), "split_sizes": rows})
        return
    if args.small_batches:
        rows = small_batches()
        if args.out:
            write_result(args.out, {"gpu": torch.cuda.get_device_name(), "small_batches": rows})
        return
    if args.once:  # cache: bf16, or an FP8_VARIANTS name prefixed "fp8" ("fp8" = the default, "fp8 staged w8")
        name, dname = args.once.split("|")
        dtype = torch.bfloat16 if dname == "bf16" else torch.float8_e4m3fn
        case = make_case(*SHAPES[name], dtype)
        if dname in ("bf16", "fp8-bits"):
            kw = dict(fp8_decode="bits" if dname == "fp8-bits" else "auto")
        else:
            kw = FP8_VARIANTS[dname[3:].strip() or "default"]
        for _ in range(3):
            time_config(case, **kw)
        return
    if args.fp8_variants:
        rows = fp8_variants(args.variants)
        for r in rows:
            if "us" not in r:
                print(f"{r['shape']:25s} {r['variant']:16s} {r['error']}")
                continue
            same = "bit-identical to default" if r["identical_to_default"] else "differs from default"
            err = f"fp64 err max {r['max_abs_err_fp64']:.2e} mean {r['mean_abs_err_fp64']:.3e}"
            speed = f"{r['us']:8.1f} us  x{r['speedup_vs_bf16']:.2f} vs bf16"
            print(f"{r['shape']:25s} {r['variant']:16s} {speed}  {same}  {err}")
        if args.out:
            write_result(args.out, {"gpu": torch.cuda.get_device_name(), "fp8_variants": rows})
        return
    block_ns = (32, 64, 128) if args.quick else (32, 64, 128, 256)
    warps = (4, 8) if args.quick else (2, 4, 8)
    stages = (1, 2, 3)
    split_tokens = (512, 1024, 2048)
    results = []
    dtypes = [("bf16", torch.bfloat16, "auto"), ("fp8", torch.float8_e4m3fn, "auto")]
    dtypes.append(("fp8-bits", torch.float8_e4m3fn, "bits"))
    for (name, shp), (dname, dtype, fp8_decode) in itertools.product(SHAPES.items(), dtypes):
        case = make_case(*shp, dtype)
        nbytes = case[-1]
        default = time_config(case, fp8_decode)
        graph_grid = time_config(case, fp8_decode, num_splits=64)
        best = (default, {})
        sweep = itertools.product(block_ns, warps, stages) if fp8_decode == "auto" else []
        for bn, w, st in sweep:
            try:
                ms = time_config(case, fp8_decode, block_n=bn, num_warps=w, num_stages=st)
            except Exception as e:  # noqa: BLE001 - out of shared memory and the like
                print(f"  skip {name} {dname} bn{bn} w{w} s{st}: {type(e).__name__}")
                continue
            if ms < best[0]:
                best = (ms, dict(block_n=bn, num_warps=w, num_stages=st))
        for sp in split_tokens:
            cfg = {**best[1], "split_tokens": sp}
            ms = time_config(case, fp8_decode, **cfg)
            if ms < best[0]:
                best = (ms, cfg)
        row = {
            "shape": name,
            "cache": dname,
            "default_us": 1e3 * default,
            "graph_grid_us": 1e3 * graph_grid,
            "best_us": 1e3 * best[0],
            "best": best[1],
            "default_tbs": nbytes / default / 1e9,
            "best_tbs": nbytes / best[0] / 1e9,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        del case
        torch.cuda.empty_cache()
    print("\nshape                     cache     default_us graph_us  best_us  TB/s  best")
    for r in results:
        print(
            f"{r['shape']:25s} {r['cache']:9s} {r['default_us']:9.1f} {r['graph_grid_us']:8.1f} {r['best_us']:8.1f} "
            f"{r['best_tbs']:5.2f}  {r['best']}"
        )
    if args.out:
        write_result(args.out, {"gpu": torch.cuda.get_device_name(), "results": results})


if __name__ == "__main__":
    main()
