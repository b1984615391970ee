"""Experiment: where the skinny GEMM's 64-row launches let the next kernel start, end to end (needs a Hopper GPU).

    python benchmarks/release_point_ab.py [--rounds 3] [--out release_point_ab.json]

`pdl_chain.py` found that at 64 rows a chain of a layer's kernels runs faster when every GEMM releases its
dependents at its start (`skinny_linear(release_early=True)`) than after its main loop, the engine's choice, while
at 1 and 16 rows it runs slower. This runs the Llama-3.2-1B shape at batch 64 (prompt 512, 256 new, bf16 KV)
through benchmarks/throughput.py with the engine's 64-row GEMM launches releasing early, then as shipped,
alternated `--rounds` times in one process, and reports each run's decode step and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import miniserve.kernels.linear as linear_module  # noqa: E402
from benchmarks.provenance import write_result  # noqa: E402
from benchmarks.throughput import main as throughput  # noqa: E402

SHIPPED = linear_module.skinny_linear
ARGS = ["--shape", "llama-3.2-1b", "--workload", "fixed", "--batch", "64", "--prompt", "512", "--gen", "256",
        "--repeats", "2"]  # fmt: skip


def early(x, weight, bias=None, config=None, pdl=False, release_early=False, silu_mul=False):
    """The engine's call (`linear`'s, or `linear_silu_and_mul`'s with silu_mul), with its 64-row launches releasing
    their dependents before the main loop."""
    release = pdl and config is not None and config[0] == 64
    return SHIPPED(x, weight, bias, config, pdl=pdl, release_early=release, silu_mul=silu_mul)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for release in ("start", "after_loop"):
                linear_module.skinny_linear = early if release == "start" else SHIPPED
                run = throughput(ARGS + ["--out", f"{tmp}/{i}_{release}.json"])["runs"][0]
                runs.append({"release": release, "round": i, "output_tok_s": run["output_tok_s"],
                             "decode_step_ms": run["decode_step_ms_direct"]})  # fmt: skip
    linear_module.skinny_linear = SHIPPED
    medians = {r: statistics.median(x["decode_step_ms"] for x in runs if x["release"] == r)
               for r in ("start", "after_loop")}  # fmt: skip
    print(f"median decode step: release at start {medians['start']:.4f} ms, after the loop {medians['after_loop']:.4f}")
    if args.out:
        write_result(args.out, {"workload": " ".join(ARGS), "runs": runs, "median_decode_step_ms": medians})


if __name__ == "__main__":
    main()
