"""The fused sampling kernel (miniserve/kernels/sampling.py) on a GPU: checks, then time against torch's sampler.

    python benchmarks/sampling_kernel.py [--out sampling_kernel.json]

Checks (counts of disagreements; each should be 0):
- argmax: the kernel against torch.argmax on bf16 and fp32 logits at real vocabularies, with rows of ties, NaN
  and -inf;
- race: the kernel against its torch reference fed the kernel's own uniforms (Triton's Philox at the same
  offsets); the GPU's log may round differently from torch's, which can only flip a near-tie;
- masked: a grammar's packed masks in the kernel, greedy rows against the torch path, sampled rows against the
  reference, and draws of tokens the mask rules out;
- distribution: 400,000 draws over 7 tokens at three temperatures against softmax(logits / T): the chi-square
  statistic (6 degrees of freedom; 27.9 is p = 1e-4).
Timing, medians: eager launches (host overhead included, as the engine calls it; triton.testing.do_bench) and GPU
time alone (CUDA-graph replay: what counts when the host runs ahead, as in overlapped decoding) of the engine's
`sample` for a greedy batch and for temperature 0.6, with the kernel and with torch's path (for greedy rows, the
torch.argmax it used before), at batch 1, 64 and 256 of Llama-3 (128,256) and Qwen3 (151,936) vocabularies; and
for a constrained batch (masks on every row) at batch 32 and 64, the torch path against the kernel with the masks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import write_result  # noqa: E402
from miniserve.engine import sampler as sampler_module  # noqa: E402
from miniserve.engine.sampler import SamplingBatch, apply_token_bitmask, sample  # noqa: E402
from miniserve.kernels.sampling import gumbel_argmax, gumbel_argmax_reference  # noqa: E402
from miniserve.sampling_params import SamplingParams  # noqa: E402

SHAPES = [(1, 128256), (64, 128256), (256, 151936)]
FUSED = sampler_module._fused


@triton.jit
def _uniforms_kernel(out_ptr, seed, vocab, BLOCK: tl.constexpr):
    """Triton's Philox uniforms at the offsets the sampling kernel uses (row * vocab + column)."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + row * vocab + cols, tl.rand(seed, row * vocab + cols), mask=cols < vocab)


def kernel_uniforms(rows: int, vocab: int, seed: int, device) -> torch.Tensor:
    """The uniforms [rows, vocab] gumbel_argmax draws with `seed`: what its reference needs to agree draw for draw."""
    out = torch.empty(rows, vocab, device=device)
    _uniforms_kernel[(rows, triton.cdiv(vocab, 1024))](out, seed, vocab, BLOCK=1024)
    return out


def check_argmax(device, shapes=SHAPES) -> list[dict]:
    rows = []
    for (b, v), dtype in [(s, d) for s in shapes for d in (torch.bfloat16, torch.float32)]:
        logits = torch.randn(b, v, device=device).to(dtype)
        logits[::4] = logits[::4].round()  # ties
        logits[1::8, v // 2 :: 997] = float("nan")
        if b > 2:
            logits[2] = float("-inf")
        bad = (gumbel_argmax(logits, None, 0) != logits.argmax(dim=-1)).sum().item()
        rows.append({"batch": b, "vocab": v, "dtype": str(dtype), "mismatches": bad})
    return rows


def check_race(device, shapes=SHAPES) -> list[dict]:
    rows = []
    for b, v in shapes:
        logits = torch.randn(b, v, device=device).to(torch.bfloat16)
        temperature = torch.rand(b, device=device) + 0.2
        temperature[::3] = 0.0  # greedy rows
        want = gumbel_argmax_reference(logits, temperature, kernel_uniforms(b, v, 1234, device))
        bad = (gumbel_argmax(logits, temperature, 1234) != want).sum().item()
        rows.append({"batch": b, "vocab": v, "mismatches": bad})
    return rows


def random_bitmask(rows: int, vocab: int, device) -> torch.Tensor:
    """A grammar's packed masks in xgrammar's layout (int32 [rows, ceil(vocab / 32)]), random bits; row 0 allows
    nothing, row 1 everything."""
    words = torch.randint(-(2**31), 2**31, (rows, triton.cdiv(vocab, 32)), device=device, dtype=torch.int64)
    bitmask = words.to(torch.int32)
    bitmask[0] = 0
    if rows > 1:
        bitmask[1] = -1
    return bitmask


def check_masked(device, shapes=SHAPES) -> list[dict]:
    """Grammar masks in the kernel: greedy rows against the torch path (unpack the bits, mask, argmax), sampled rows
    against the reference fed the kernel's uniforms, and whether any drawn token is one the mask rules out."""
    rows = []
    for b, v in shapes:
        logits = torch.randn(b, v, device=device).to(torch.bfloat16)
        bitmask = random_bitmask(b, v, device)
        greedy = gumbel_argmax(logits, None, 0, bitmask)
        torch_path = apply_token_bitmask(logits.float(), bitmask).argmax(dim=-1)
        temperature = torch.rand(b, device=device) + 0.2
        drawn = gumbel_argmax(logits, temperature, 77, bitmask)
        want = gumbel_argmax_reference(logits, temperature, kernel_uniforms(b, v, 77, device), bitmask)
        bits = (bitmask.gather(1, (drawn // 32)[:, None]).squeeze(1) >> (drawn % 32).to(torch.int32)) & 1
        rows.append({
            "batch": b, "vocab": v, "greedy_mismatches": (greedy != torch_path).sum().item(),
            "race_mismatches": (drawn != want).sum().item(), "banned_draws": (bits[1:] == 0).sum().item(),
        })  # fmt: skip
    return rows


def check_distribution(device) -> list[dict]:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], device=device)
    n, rows = 400_000, []
    for t in (0.5, 1.0, 2.5):
        draws = gumbel_argmax(logits.expand(n, -1).contiguous(), torch.full((n,), t, device=device), 99)
        counts = torch.bincount(draws, minlength=7).double()
        expected = n * torch.softmax(logits.double() / t, dim=0)
        rows.append({"temperature": t, "chi2": ((counts - expected) ** 2 / expected).sum().item()})
    return rows


def time_sample(device) -> list[dict]:
    rows = []
    for b, v in SHAPES:
        logits = torch.randn(b, v, device=device).to(torch.bfloat16)
        for temp in (0.0, 0.6):
            ps = [SamplingParams(temperature=temp, max_tokens=8)] * b
            fused = SamplingBatch.build(ps, [None] * b, [[1]] * b, [[2]] * b, set(), v, device)
            plain = SamplingBatch(**{**fused.__dict__, "race_temperature": None})
            row = {"batch": b, "vocab": v, "temperature": temp}
            for name, batch in (("torch", plain), ("kernel", fused)):
                if temp == 0.0 and name == "torch":
                    fn = lambda: logits.argmax(dim=-1)  # noqa: E731, B023 - what `sample` ran before the kernel
                else:
                    fn = lambda: sample(logits, batch)  # noqa: E731, B023
                row[f"{name}_us"] = 1e3 * triton.testing.do_bench(fn, return_mode="median")
                row[f"{name}_gpu_us"] = 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
            row["speedup"] = row["torch_us"] / row["kernel_us"]
            row["gpu_speedup"] = row["torch_gpu_us"] / row["kernel_gpu_us"]
            rows.append(row)
            print(row, flush=True)
    return rows


def time_masked_sample(device) -> list[dict]:
    """The engine's `sample` for a constrained batch (a grammar mask on every row, no seed): the torch path (unpack,
    mask, softmax, noise, argmax) against the kernel with the masks, eager and in a graph."""
    rows = []
    for b, v in [(32, 128256), (64, 128256)]:
        logits = torch.randn(b, v, device=device).to(torch.bfloat16)
        bitmask = random_bitmask(b, v, device)
        for temp in (0.0, 1.0):
            ps = [SamplingParams(temperature=temp, max_tokens=8)] * b
            fused = SamplingBatch.build(ps, [None] * b, [[1]] * b, [[2]] * b, set(), v, device, token_bitmask=bitmask)
            row = {"batch": b, "vocab": v, "temperature": temp}
            for name, on in (("torch", False), ("kernel", True)):
                sampler_module._fused = (lambda logits: True) if on else (lambda logits: False)  # noqa: E731
                batch = fused if on else SamplingBatch(**{**fused.__dict__, "race_temperature": None})
                fn = lambda: sample(logits, batch)  # noqa: E731, B023
                row[f"{name}_us"] = 1e3 * triton.testing.do_bench(fn, return_mode="median")
                row[f"{name}_gpu_us"] = 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
            sampler_module._fused = FUSED
            row["speedup"] = row["torch_us"] / row["kernel_us"]
            row["gpu_speedup"] = row["torch_gpu_us"] / row["kernel_gpu_us"]
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    result = {
        "gpu": torch.cuda.get_device_name(),
        "argmax": check_argmax(device),
        "race": check_race(device),
        "distribution": check_distribution(device),
    }
    result["masked"] = check_masked(device)
    for key in ("argmax", "race", "distribution", "masked"):
        print(key, result[key], flush=True)
    result["timing"] = time_sample(device)
    result["masked_timing"] = time_masked_sample(device)
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
