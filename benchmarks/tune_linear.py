"""Decode-step linear layers: a skinny Triton GEMM against cuBLAS (needs a GPU; the kernel's test runs anywhere).

    python benchmarks/tune_linear.py [--out tune_linear.json]

The question: are the small projections of a decode step (Llama-3.2-1B's q/k/v and output, 8-12 MB, at 1.3-2
TB/s with cuBLAS in `profile_decode_llama1b_b*_h200.json`) slow because of cuBLAS's kernels, or because a
kernel that reads a few MB cannot reach HBM bandwidth? `skinny_linear` (miniserve/kernels/linear.py) is the obvious
alternative: every program a narrow slice of output columns (BLOCK_N) over the reduction (whole, or split in parts
summed by the tile's last program) in BLOCK_K steps, fp32 accumulation. The answer (`tune_linear_h200.json`):
about cuBLAS's speed alone, faster where a split reduction fills idle SMs. The engine runs it
where it can launch it as a programmatic dependent (benchmarks/pdl_chain.py), with `skinny_config`'s launch
settings, which come from this sweep.

For each projection of the real shapes (Llama-3.2-1B, Llama-3.1-8B, Qwen3-0.6B) and each decode batch size it
times F.linear and every launch config of the Triton kernel, each as a CUDA graph of back-to-back launches that
cycle through enough copies of the weight to overflow L2 (a decode step reads every weight from HBM once; timing
one weight over and over would read it from L2). Reports microseconds a launch, weight bandwidth, and the
Triton output's largest error against an fp64 product next to cuBLAS's. Then each model's gate/up projection
with the SiLU·mul after it: two launches against the one of `linear_silu_and_mul` (`--gate-up`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import write_result  # noqa: E402
from miniserve.kernels.layer_ops import silu_and_mul  # noqa: E402
from miniserve.kernels.linear import gate_up_config, skinny_linear  # noqa: E402

# name: (N, K) of the weight
SHAPES = {
    "llama-1b qkv": (3072, 2048),
    "llama-1b o": (2048, 2048),
    "llama-1b gate_up": (16384, 2048),
    "llama-1b down": (2048, 8192),
    "llama-8b qkv": (6144, 4096),
    "llama-8b o": (4096, 4096),
    "llama-8b gate_up": (28672, 4096),
    "llama-8b down": (4096, 14336),
    "qwen3-0.6b qkv": (4096, 1024),
    "qwen3-0.6b o": (1024, 2048),
    "qwen3-0.6b down": (1024, 3072),
}
GATE_UP = {"llama-1b": (8192, 2048), "llama-8b": (14336, 4096), "qwen3-0.6b": (3072, 1024)}  # (I, K)
BATCHES = (1, 8, 16, 32, 64)  # up to SKINNY_MAX_ROWS
ROTATE_BYTES = 512 << 20  # weight copies cycled through per graph: 10x the H200's L2


def replay_us(run, replays: int = 5):
    """`run()` warmed up on a side stream, captured as one CUDA graph, replayed `replays` times: the median
    microseconds a replay, and what the captured run returned. (Not bench_kv_write.bench_gpu_ms, Triton's
    do_bench_cudagraph: that captures `run` over and over to fill 50 ms, thousands of launches to capture for
    each of this sweep's ~3,000 configurations, and does not return what the run computed.)"""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[replays // 2], out


def time_launches(fn, copies: list[torch.Tensor], x: torch.Tensor, launches: int = 60) -> float:
    """Median microseconds a launch over 5 replays of a graph of `launches` calls cycling through `copies`."""
    us, _ = replay_us(lambda: [fn(x, copies[i % len(copies)]) for i in range(launches)])
    return us / launches


# (BLOCK_N, BLOCK_K, warps, stages): tiles near the winners of the earlier sweep over 3 x 3 x 3 x 2 without split
# (`tune_linear_h200.json` at 06dfe61 in git), plus wider slices for split reductions; each with the reduction in
# 1, 2 and 4 parts
TILES = ((16, 512, 2, 3), (16, 256, 4, 4), (16, 128, 2, 5), (32, 256, 4, 4), (32, 128, 4, 5), (64, 128, 4, 3),
         (64, 256, 4, 3), (128, 128, 4, 3))  # fmt: skip


def configs(m: int):
    block_m = 16 if m <= 16 else 64
    for (bn, bk, w, st), split in itertools.product(TILES, (1, 2, 4)):
        yield dict(block_m=block_m, block_n=bn, block_k=bk, num_warps=w, num_stages=st, split_k=split)


def tune_shape(name: str, n: int, k: int) -> list[dict]:
    wbytes = n * k * 2
    count = max(2, ROTATE_BYTES // wbytes)
    copies = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
    rows = []
    for m in BATCHES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        exact = (x.double() @ copies[0].double().T).float()
        cublas_us = time_launches(F.linear, copies, x)
        cublas_err = (F.linear(x, copies[0]).float() - exact).abs().max().item()
        best = None
        for cfg in configs(m):
            if k % (cfg["block_k"] * cfg["split_k"]):
                continue
            fn = lambda a, w, cfg=cfg: skinny_linear(a, w, config=tuple(cfg.values()))  # noqa: E731
            try:
                out = fn(x, copies[0])
                us = time_launches(fn, copies, x)
            except Exception as e:  # noqa: BLE001 - out of shared memory and the like
                print(f"  skip {name} m{m} {cfg}: {type(e).__name__}", flush=True)
                continue
            err = (out.float() - exact).abs().max().item()
            if best is None or us < best["us"]:
                best = {"config": cfg, "us": us, "max_abs_err": err}
        row = {"shape": name, "n": n, "k": k, "m": m, "cublas_us": cublas_us, "cublas_tbs": wbytes / cublas_us / 1e6,
               "cublas_max_abs_err": cublas_err, "triton_us": best["us"], "triton_tbs": wbytes / best["us"] / 1e6,
               "triton_max_abs_err": best["max_abs_err"], "triton_config": best["config"],
               "speedup": cublas_us / best["us"]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    del copies
    torch.cuda.empty_cache()
    return rows


def tune_gate_up(name: str, inter: int, k: int) -> list[dict]:
    """The MLP's gate/up projection with its SiLU·mul: the skinny GEMM of the stacked weight then layer_ops' kernel
    (two launches, what the engine ran before `linear_silu_and_mul`) against one launch with the SiLU·mul in the
    GEMM's epilogue, at gate_up_config's settings and at the best of TILES (unsplit; BLOCK_N = each half's)."""
    copies = [torch.randn(2 * inter, k, device="cuda", dtype=torch.bfloat16) * 0.02
              for _ in range(max(2, ROTATE_BYTES // (4 * inter * k)))]  # fmt: skip
    rows = []
    for m in BATCHES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        two_us = time_launches(lambda a, w: silu_and_mul(skinny_linear(a, w)), copies, x)
        default = gate_up_config(m, k, inter)
        timed = {}
        for bn, bk, w, st in set(TILES) | {default[1:5]}:
            cfg = (16 if m <= 16 else 64, bn, bk, w, st, 1)
            if k % bk:
                continue
            try:
                timed[cfg] = time_launches(lambda a, wt, cfg=cfg: skinny_linear(a, wt, config=cfg, silu_mul=True),
                                           copies, x)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - out of shared memory and the like
                print(f"  skip {name} gate_up+silu m{m} {cfg}: {type(e).__name__}", flush=True)
        best = min(timed, key=timed.get)
        row = {"shape": name, "inter": inter, "k": k, "m": m, "two_launch_us": two_us, "default_config": default,
               "default_us": timed[default], "best_config": best, "best_us": timed[best],
               "default_speedup": two_us / timed[default]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    del copies
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--gate-up", nargs="*", choices=list(GATE_UP), default=list(GATE_UP),
                    help="models whose gate/up + SiLU launch to time (none: skip)")  # fmt: skip
    args = ap.parse_args()
    rows = [r for name in args.shapes for r in tune_shape(name, *SHAPES[name])]
    gate_up = [r for name in args.gate_up for r in tune_gate_up(name, *GATE_UP[name])]
    print("\nshape              m   cuBLAS us  TB/s  triton us  TB/s  speedup  config")
    for r in rows:
        c = r["triton_config"]
        print(f"{r['shape']:18s} {r['m']:3d} {r['cublas_us']:10.1f} {r['cublas_tbs']:5.2f} {r['triton_us']:10.1f} "
              f"{r['triton_tbs']:5.2f} {r['speedup']:7.2f}  bn{c['block_n']} bk{c['block_k']} w{c['num_warps']} "
              f"s{c['num_stages']} split{c['split_k']}")  # fmt: skip
    for r in gate_up:
        print(
            f"{r['shape']:10s} gate/up+SiLU m{r['m']:<3d} two launches {r['two_launch_us']:6.1f} us, one "
            f"{r['default_us']:6.1f} (x{r['default_speedup']:.2f}; best {r['best_us']:6.1f} {r['best_config']})"
        )
    if args.out:
        write_result(args.out, {"gpu": torch.cuda.get_device_name(), "rows": rows, "gate_up_rows": gate_up})


if __name__ == "__main__":
    main()
