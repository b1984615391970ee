"""Time the extend (prefill) attention kernel's launch variants on a long prompt, against the default and torch
SDPA, and check every variant's output (needs a GPU).

    python benchmarks/tune_extend_attention.py [--shapes qwen3-0.6b ...] [--caches bf16 fp8] [--prompt 32768]
        [--chunk 8192] [--variants default diag ...] [--out extend_variants.json]

The case is what the engine runs for one layer of a `--prompt`-token prompt at max_num_batched_tokens=`--chunk`:
the prompt in chunks, chunk i attending causally to its own tokens and the i chunks before it, from a paged cache
(block size 16, pages shuffled over the pool). Per variant: GPU time of all the chunks (CUDA-graph replay,
median), times the model's layer count = the attention part of the prompt's time to first token; the causal
attention FLOP rate; the same for torch SDPA over the whole prompt at once (dense bf16 K/V, causal, GQA: the
attention inside one Hugging Face SDPA forward); and correctness: the max difference to SDPA over the
(dequantized) cache, to the default kernel, and whether it is bit-identical to the default.

The variants are the ones that offline compiler analysis found worth timing (benchmarks/kernel_resources.py
--variants; write-up in benchmarks/results/extend_attention_registers.md) and the fastest of the H200 runs
(extend_attention_variants_h200.json), from which extend_attention.launch_config picks "default" by shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: extend_attention keyword arguments (tests/test_gpu_config.py runs every one against the torch reference)
# The launch before launch_config picked tiles by shape (64-row tiles, 4 warps, masks on every tile): variants
# below are changes to it, so their names keep one meaning across result files; "default" is launch_config's choice.
PLAIN = dict(block_m=64, num_warps=4, num_stages=2, maxnreg=0, split_diag=False, same_kv_strides=False)


def _plain(**changes) -> dict:
    return {**PLAIN, **changes}


BM128 = dict(block_m=128, num_warps=8)
# name: extend_attention keyword arguments (tests/test_gpu_config.py runs every one against the torch reference)
EXTEND_VARIANTS = {
    "default": {},
    "plain": _plain(),
    "diag": _plain(split_diag=True),
    "diag same": _plain(split_diag=True, same_kv_strides=True),
    "diag same rev": _plain(split_diag=True, same_kv_strides=True, reverse=True),
    "diag fma same": _plain(split_diag="fma", same_kv_strides=True),
    # the default launch with FP8's registers capped (offline, sm_90: 185 registers at head_dim 64, two programs an
    # SM; 168 -> three, no spill; 128 -> four, 264 bytes of spill): measured by `h200_suite.sh extendfp8`
    "diag same r168": _plain(split_diag=True, same_kv_strides=True, maxnreg=168),
    "diag same r128": _plain(split_diag=True, same_kv_strides=True, maxnreg=128),
    "bm128 w8 diag same": _plain(**BM128, split_diag=True, same_kv_strides=True),
    "bm128 w8 diag same r128": _plain(**BM128, split_diag=True, same_kv_strides=True, maxnreg=128),
    "bm128 w8 s3 diag same r128": _plain(**BM128, num_stages=3, split_diag=True, same_kv_strides=True, maxnreg=128),
    "bm128 w8 diagfma same": _plain(**BM128, split_diag="fma", same_kv_strides=True),
    "pack w8 diag same": _plain(gqa_pack=True, num_warps=8, split_diag=True, same_kv_strides=True),
    "pack w8 diagfma same": _plain(gqa_pack=True, num_warps=8, split_diag="fma", same_kv_strides=True),
    "pack w8 diag same r128": _plain(gqa_pack=True, num_warps=8, split_diag=True, same_kv_strides=True, maxnreg=128),
    "pack bm32 diag same": _plain(gqa_pack=True, block_m=32, split_diag=True, same_kv_strides=True),
    "staged": dict(fp8_decode="hw-staged"),  # the default launch reading V by the staged FP8 conversion
}
SHAPES = {  # name: (query heads, KV heads, head_dim, layers) -- benchmarks/throughput.py's checkpoints
    "qwen3-0.6b": (16, 8, 128, 28),
    "llama-3.2-1b": (32, 8, 64, 16),
    "llama-3.1-8b": (32, 8, 128, 32),
}
CACHES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
BLOCK_SIZE = 16


def make_prompt_case(shape: str, cache: str, prompt: int, chunk: int, seed: int = 0, device: str = "cuda") -> dict:
    """One prompt's queries, its K/V in a shuffled paged cache, the chunks' metadata, and the dense K/V (the
    values the cache holds, bf16) for SDPA."""
    from miniserve.kernels import AttentionMetadata
    from miniserve.kernels.fp8 import is_fp8

    hq, hkv, d, _ = SHAPES[shape]
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    blocks = -(-prompt // BLOCK_SIZE)
    cache_shape = (blocks, BLOCK_SIZE, hkv, d)
    dtype = CACHES[cache]
    if is_fp8(dtype):  # finite codes of magnitude [2^-3, 2^4), both signs
        kc = torch.randint(0x20, 0x58, cache_shape, dtype=torch.uint8, device=dev, generator=g)
        kc |= torch.randint(0, 2, cache_shape, dtype=torch.uint8, device=dev, generator=g) << 7
        vc = torch.randint(0x20, 0x58, cache_shape, dtype=torch.uint8, device=dev, generator=g)
        kc, vc = kc.view(dtype), vc.view(dtype)
    else:
        kc = torch.randn(cache_shape, dtype=dtype, device=dev, generator=g)
        vc = torch.randn(cache_shape, dtype=dtype, device=dev, generator=g)
    table = torch.randperm(blocks, device=dev, generator=g).int()
    q = torch.randn(prompt, hq, d, dtype=torch.bfloat16, device=dev, generator=g)
    k_scale = torch.tensor([0.05 if is_fp8(dtype) else 1.0], device=dev)
    v_scale = torch.tensor([0.5 if is_fp8(dtype) else 1.0], device=dev)
    metas = []
    for start in range(0, prompt, chunk):
        n = min(chunk, prompt - start)
        metas.append(
            AttentionMetadata(
                slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=dev),
                query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
                seq_lens=torch.tensor([start + n], dtype=torch.int32, device=dev),
                block_tables=table[None, : -(-(start + n) // BLOCK_SIZE)].contiguous(),
                max_query_len=n,
                max_seq_len=start + n,
            )
        )
    # the values the cache stands for, in position order: [hkv, prompt, d]
    dense_k = (kc[table.long()].float() * k_scale).reshape(-1, hkv, d)[:prompt].transpose(0, 1)
    dense_v = (vc[table.long()].float() * v_scale).reshape(-1, hkv, d)[:prompt].transpose(0, 1)
    return dict(q=q, kc=kc, vc=vc, metas=metas, scales=(k_scale, v_scale), sm_scale=d**-0.5, chunk=chunk,
                dense_k=dense_k.to(torch.bfloat16), dense_v=dense_v.to(torch.bfloat16))  # fmt: skip


def run_chunks(case: dict, **kw) -> list[torch.Tensor]:
    """The extend kernel over every chunk, as the engine runs them: each chunk's [tokens, hq, d]."""
    from miniserve.kernels.extend_attention import extend_attention

    out, c = [], case["chunk"]
    for i, meta in enumerate(case["metas"]):
        q = case["q"][i * c : i * c + meta.max_query_len]
        out.append(extend_attention(q, case["kc"], case["vc"], meta, *case["scales"], case["sm_scale"], **kw))
    return out


def sdpa(case: dict) -> torch.Tensor:
    """torch SDPA over the whole prompt at once (what HF's sdpa attention runs per layer): [prompt, hq, d]."""
    q = case["q"].transpose(0, 1)[None]
    k, v = case["dense_k"][None], case["dense_v"][None]
    o = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=case["sm_scale"], enable_gqa=True
    )  # fmt: skip
    return o[0].transpose(0, 1)


def causal_flops(prompt: int, hq: int, d: int) -> float:
    return 4.0 * hq * d * prompt * (prompt + 1) / 2


def measure(shapes, caches, variants, prompt: int, chunk: int, device: str = "cuda", timer=None) -> list[dict]:
    """timer(fn) -> milliseconds; default: CUDA-graph replay, median (a CPU test passes its own)."""
    if timer is None:
        from benchmarks.bench_kv_write import bench_gpu_ms as timer

    rows = []
    for shape in shapes:
        hq, _, d, layers = SHAPES[shape]
        for cache in caches:
            case = make_prompt_case(shape, cache, prompt, chunk, device=device)
            ref = sdpa(case).float()
            sdpa_ms = timer(functools.partial(sdpa, case))
            flops = causal_flops(prompt, hq, d)
            base = {"shape": shape, "cache": cache, "prompt": prompt, "chunk": chunk, "layers": layers}
            sdpa_row = dict(base, variant="torch sdpa (whole prompt)", ms=sdpa_ms, tflops=flops / sdpa_ms / 1e9)
            sdpa_row["model_attention_s"] = sdpa_ms * layers / 1e3
            rows.append(sdpa_row)
            print(json.dumps(sdpa_row), flush=True)
            default = torch.cat(run_chunks(case))
            for name in variants:
                kw = EXTEND_VARIANTS[name]
                row = dict(base, variant=name, **kw)
                try:
                    out = torch.cat(run_chunks(case, **kw))
                    ms = timer(functools.partial(run_chunks, case, **kw))
                except Exception as e:  # noqa: BLE001 - out of shared memory and the like
                    rows.append(dict(row, error=f"{type(e).__name__}: {str(e)[:300]}"))
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                err = (out.float() - ref).abs()
                row.update(
                    ms=ms,
                    tflops=flops / ms / 1e9,
                    model_attention_s=ms * layers / 1e3,
                    vs_sdpa=sdpa_ms / ms,
                    max_abs_diff_to_sdpa=err.max().item(),
                    mean_abs_diff_to_sdpa=err.mean().item(),
                    finite=bool(torch.isfinite(out).all()),
                    identical_to_default=bool(torch.equal(out, default)),
                    max_abs_diff_to_default=(out.float() - default.float()).abs().max().item(),
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
            case = ref = default = None  # free the prompt's tensors before the next case
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["qwen3-0.6b"], choices=list(SHAPES))
    ap.add_argument("--caches", nargs="+", default=["bf16", "fp8"], choices=list(CACHES))
    ap.add_argument("--variants", nargs="+", default=list(EXTEND_VARIANTS), choices=list(EXTEND_VARIANTS))
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens: the engine's prompt chunk")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = measure(args.shapes, args.caches, args.variants, args.prompt, args.chunk)
    print(f"\n{'shape':13s} {'cache':5s} {'variant':26s} {'ms/layer':>9s} {'TFLOP/s':>8s} {'model s':>8s}  check")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:13s} {r['cache']:5s} {r['variant']:26s} {r['error'][:80]}")
            continue
        check = ""
        if "identical_to_default" in r:
            diff = f"{r['max_abs_diff_to_default']:.1e} vs default"
            same = "identical to default" if r["identical_to_default"] else diff
            check = f"max|diff| to sdpa {r['max_abs_diff_to_sdpa']:.1e}, {same}"
        print(
            f"{r['shape']:13s} {r['cache']:5s} {r['variant']:26s} {r['ms']:9.3f} {r['tflops']:8.1f} "
            f"{r['model_attention_s']:8.3f}  {check}"
        )
    if args.out:
        from benchmarks.provenance import write_result

        write_result(args.out, {"gpu": torch.cuda.get_device_name(), "rows": rows})


if __name__ == "__main__":
    main()
