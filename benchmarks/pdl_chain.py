"""Experiment: a decode layer's chain of kernels with programmatic dependent launch (needs a Hopper GPU).

    python benchmarks/pdl_chain.py [--out pdl_chain.json]

Per layer (16 layers of Llama-3.2-1B's weights, each layer its own): a tiny elementwise kernel before each of
q/k/v, output, gate/up and down projections, as RMSNorm, attention and SiLU sit before them in the model.
Variants, each one CUDA graph of the 16 layers: cuBLAS; the engine's skinny Triton GEMM (kernels/linear.py, its own
launch settings); both kernels launched dependent (PDL: a kernel starts while the one before finishes, and waits for
its results with griddepcontrol; kernels/dependent_launch.py). (The version of 578f856 also tried the GEMM prefetching
its weights into L2 before it waits: no faster, `pdl_chain_h200.json` of that commit in git.) Last, the dependent
chain with gate/up applying the SiLU·mul in its epilogue, one small kernel a layer fewer (`linear_silu_and_mul`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import write_result  # noqa: E402
from benchmarks.tune_linear import replay_us  # noqa: E402
from miniserve.kernels.dependent_launch import launch_options, release_dependents, wait_for_previous  # noqa: E402
from miniserve.kernels.linear import skinny_linear  # noqa: E402

WEIGHTS = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
VARIANTS = ("cublas", "triton", "triton+pdl", "triton+pdl-early", "triton+pdl+silu")


@triton.jit
def _tiny_kernel(x_ptr, out_ptr, cols, stride_x, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    release_dependents(USE_PDL)
    wait_for_previous(USE_PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < cols)
    tl.store(out_ptr + row * cols + offs, x * 0.5, mask=offs < cols)


def tiny(x: torch.Tensor, pdl: bool) -> torch.Tensor:
    """x * 0.5 into a new contiguous tensor (x: rows of unit stride, e.g. the first columns of a wider matrix)."""
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    grid = (rows, triton.cdiv(cols, 1024))
    _tiny_kernel[grid](x, out, cols, x.stride(0), BLOCK=1024, USE_PDL=pdl, **launch_options(pdl))
    return out


def layer(x, w, gemm, pdl, fused_silu=False):
    """fused_silu: gate/up with the SiLU·mul in its epilogue (`linear_silu_and_mul`), which replaces the small
    kernel before down (SiLU·mul in the model)."""
    h = tiny(x, pdl)
    gemm(h, w["qkv"])
    y = gemm(tiny(h, pdl), w["o"])
    if fused_silu:
        return gemm(skinny_linear(tiny(y, pdl), w["gate_up"], pdl=True, silu_mul=True), w["down"])
    z = gemm(tiny(y, pdl), w["gate_up"])
    return gemm(tiny(z[:, :8192], pdl), w["down"])


def make_gemm(variant: str):
    if variant == "cublas":
        return lambda x, w: F.linear(x, w)
    return lambda x, w: skinny_linear(x, w, pdl=variant != "triton", release_early=variant == "triton+pdl-early")


def time_chain(variant: str, m: int, layers: list[dict]) -> tuple[float, torch.Tensor]:
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(m))
    gemm, pdl = make_gemm(variant), variant.startswith("triton+pdl")

    def run():
        h = x
        for w in layers:
            h = layer(h, w, gemm, pdl, variant == "triton+pdl+silu")
        return h

    us, out = replay_us(run, replays=21)
    return us, out.clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = [{k: torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02 for k, s in WEIGHTS.items()}
              for _ in range(16)]  # fmt: skip
    wbytes = sum(t.numel() * 2 for w in layers for t in w.values())
    rows = []
    for m in (1, 16, 64):
        ref = None
        for variant in VARIANTS:
            us, out = time_chain(variant, m, layers)
            _, again = time_chain(variant, m, layers)
            ref = out if variant == "triton" else ref
            other_math = ref is None or variant in ("cublas", "triton+pdl+silu")  # the silu variant's SiLU·mul
            same = None if other_math else bool(torch.equal(out, ref))
            diff = None if other_math else (out.float() - ref.float()).abs().max().item()
            rows.append({"m": m, "variant": variant, "us": us, "tbs": wbytes / us / 1e6, "same_as_triton": same,
                         "max_abs_diff_to_triton": diff, "repeatable": bool(torch.equal(out, again)),
                         "finite": bool(out.isfinite().all())})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        write_result(args.out, {"gpu": torch.cuda.get_device_name(), "weight_bytes": wbytes, "rows": rows})


if __name__ == "__main__":
    main()
