"""Benchmark the fused KV write against the two-launch path, and against the device's copy bandwidth.

fused:     one launch quantizes K and V (bf16 -> fp8 e4m3fn) and scatters them into their pages.
two-launch: launch 1 quantizes into contiguous staging buffers, launch 2 scatters the fp8 bytes into the pages
           (both launches are the same Triton kernel, so the difference is exactly the fusion).
Times are GPU medians from CUDA-graph replay (no host launch overhead) and, for reference, eager medians.
Usage: python benchmarks/bench_kv_write.py   (needs a GPU)
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

TOKENS = (1, 4, 16, 64, 256, 4096, 32768)
HEADS, HEAD_DIM, BLOCK_SIZE = 8, 128, 16


def import_kernels():
    """`miniserve.kernels`, importable from a bare checkout even where the engine's own imports fail (a GPU
    box without the server dependencies, or an engine mid-edit): the kernels need only torch and triton."""
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import miniserve.kernels as kernels
    except Exception as e:  # noqa: BLE001 - any failure of the engine's import chain
        print(f"note: `import miniserve` failed ({type(e).__name__}: {e}); loading miniserve.kernels alone")
        for name in [n for n in sys.modules if n == "miniserve" or n.startswith("miniserve.")]:
            del sys.modules[name]
        package = types.ModuleType("miniserve")
        package.__path__ = [str(root / "miniserve")]
        sys.modules["miniserve"] = package
        import miniserve.kernels as kernels
    return kernels


def bench_gpu_ms(fn, graph: bool = True) -> float:
    """Median milliseconds: CUDA-graph replay (GPU time only) or eager launches (host overhead included)."""
    import triton.testing

    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of 1 GiB: the practical ceiling for a read-once, write-once kernel."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench_gpu_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def bench_kv_write(device: torch.device, tokens=TOKENS, cache_dtype=torch.float8_e4m3fn) -> list[dict]:
    rows = [bench_one_write(device, t, cache_dtype) for t in tokens]
    torch.cuda.empty_cache()
    return rows


def bench_one_write(device: torch.device, t: int, cache_dtype: torch.dtype) -> dict:
    kernels = import_kernels()
    from miniserve.kernels.cache_write import reshape_and_cache_triton

    num_blocks = 2 * (-(-t // BLOCK_SIZE)) + 1
    key = torch.randn(t, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:t]
    u8 = torch.uint8
    kc = torch.zeros(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=u8, device=device).view(cache_dtype)
    vc = torch.zeros_like(kc)
    k_scale = torch.tensor([0.37], device=device)
    v_scale = torch.tensor([3.0], device=device)
    stage_k = torch.empty(t, 1, HEADS, HEAD_DIM, dtype=u8, device=device).view(cache_dtype)
    stage_v = torch.empty_like(stage_k)
    ident = torch.arange(t, device=device)

    def fused():
        kernels.reshape_and_cache(key, value, kc, vc, slots, k_scale, v_scale, backend="triton")

    def two_launch():
        reshape_and_cache_triton(key, value, stage_k, stage_v, ident, k_scale, v_scale)
        sk, sv = stage_k.view(u8).view(t, HEADS, HEAD_DIM), stage_v.view(u8).view(t, HEADS, HEAD_DIM)
        reshape_and_cache_triton(sk, sv, kc.view(u8), vc.view(u8), slots, k_scale, v_scale)

    # Both paths must store the same bytes before their speed means anything.
    fused()
    want = (kc.view(u8).clone(), vc.view(u8).clone())
    kc.view(u8).zero_(), vc.view(u8).zero_()
    two_launch()
    same = torch.equal(want[0], kc.view(u8)) and torch.equal(want[1], vc.view(u8))

    fused_ms, two_ms = bench_gpu_ms(fused), bench_gpu_ms(two_launch)
    fused_eager, two_eager = bench_gpu_ms(fused, graph=False), bench_gpu_ms(two_launch, graph=False)
    nbytes = t * HEADS * HEAD_DIM * 2 * (2 + 1) + 8 * t  # read bf16 K,V + write fp8 K,V + slots
    return dict(
        tokens=t,
        fused_us=fused_ms * 1e3,
        two_launch_us=two_ms * 1e3,
        speedup=two_ms / fused_ms,
        fused_gbs=nbytes / fused_ms / 1e6,
        eager_fused_us=fused_eager * 1e3,
        eager_two_launch_us=two_eager * 1e3,
        eager_speedup=two_eager / fused_eager,
        same_bytes=same,
    )


def tune_kv_write(device: torch.device, tokens: int = 32768) -> list[dict]:
    """Tile size x warps at the bandwidth-bound size (the launch default is 2048 elements, 4 warps)."""
    from miniserve.kernels.cache_write import reshape_and_cache_triton

    key = torch.randn(tokens, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    num_blocks = 2 * tokens // BLOCK_SIZE
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:tokens]
    kc = torch.zeros(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=torch.uint8, device=device)
    kc, vc = kc.view(torch.float8_e4m3fn), torch.zeros_like(kc).view(torch.float8_e4m3fn)
    scale = torch.ones(1, device=device)
    nbytes = tokens * HEADS * HEAD_DIM * 2 * (2 + 1) + 8 * tokens
    rows = []
    for tile in (1024, 2048, 4096, 8192):
        for warps in (4, 8):
            ms = bench_gpu_ms(
                lambda: reshape_and_cache_triton(key, value, kc, vc, slots, scale, scale, tile, warps)  # noqa: B023
            )
            rows.append(dict(tokens=tokens, tile_elements=tile, num_warps=warps, us=ms * 1e3, gbs=nbytes / ms / 1e6))
    return rows


def main() -> None:
    device = torch.device("cuda")
    ceiling = copy_bandwidth_gbs(device)
    print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {ceiling:.0f} GB/s")
    for r in bench_kv_write(device):
        print(
            f"tokens={r['tokens']:6d} fused {r['fused_us']:8.2f} us  two-launch {r['two_launch_us']:8.2f} us "
            f"x{r['speedup']:.2f}  {r['fused_gbs']:7.0f} GB/s ({r['fused_gbs'] / ceiling:.0%} of copy)  "
            f"eager x{r['eager_speedup']:.2f}  same bytes: {r['same_bytes']}"
        )


if __name__ == "__main__":
    main()
