"""The paged decode attention of two trees on the same inputs, side by side (needs a GPU): bits and kernel time.

    python benchmarks/decode_ab.py --tree OLD_TREE --save old.pt        # runs OLD_TREE's miniserve
    python benchmarks/decode_ab.py --save new.pt --compare old.pt --out decode_ab.json

Why: a change inside the kernel that must not change its numbers is checked where it runs, against the code it
replaces: every case's output bit for bit, and its time (median CUDA-graph replay) in one session on one GPU.
Inputs are seeded, so both trees see the same q, caches and block tables. Tried with it (2d37b1b against
6c61133, `decode_ab_h200.json`): the splits merged by the last split program to finish (an atomic count) instead
of a second kernel. Same bits everywhere and a faster kernel at batch 1 and 64, but no end-to-end gain beyond the
runs' spread and nano's bf16 run slower in three of three (the engine_ab_h200.json of 3f4f9c7 in git), so
it was not kept. Also tried (0092dd5 against a5b7650, `decode_prefetch_ab_h200.json`): each split reading its next
tile's block-table entries while it attends the current one. Same bits, but 0.95-1.00x at batch 64 and 256 and
0.95-0.97x for FP8 at batch 1 (more registers: the Llama-3.1-8B bf16 kernel from 93 to 106, offline), 1.03-1.06x
only for bf16 at Llama-3.1-8B's batch 1; reverted. Also tried (6daad7d against 38b4b57, H200,
`decode_full_tiles_ab_h200.json`): a split's whole tiles first, in a loop without masks (the extend kernel's
unmasked loop, scores scaled by mul_rn), which sm_90 compiles to 13-22% fewer instructions a tile (offline,
kernel_resources.py). Same bits everywhere, but 0.92-1.00x at Llama-3.2-1B's head_dim 64 (batch 1 and 64, both
caches; 0.92-0.98x with the default by-length splits), 0.99-1.07x at head_dim 128 (FP8 at Qwen3-0.6B's batch 256
1.02-1.04x); end to end, with 6daad7d's `h200_suite.sh fulltilesab` (`decode_full_tiles_engine_ab_h200.json`):
Llama-3.2-1B batch 64 1.00x bf16, 0.99x fp8, batch 1 0.99x, nano 1.04x / 1.02x bf16 and 1.00x / 1.01x fp8 (two
rounds); reverted.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

# name -> (batch, longest context, (q heads, KV heads, head_dim)); batch > 1: contexts drawn in [100, longest]
CASES = {
    "llama-1b b1 ctx640": (1, 640, (32, 8, 64)),
    "llama-1b b64 ctx640": (64, 640, (32, 8, 64)),
    "qwen3-0.6b b256 ctx100-2048": (256, 2048, (16, 8, 128)),
    "llama-8b b1 ctx4096": (1, 4096, (32, 8, 128)),
    "llama-8b b64 ctx4096": (64, 4096, (32, 8, 128)),
}
CACHES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
SPLITS = ("by-length", "by-batch")


def run_cases(device: torch.device) -> dict:
    """{case name: (output on the CPU, kernel microseconds)} for every shape x cache x decode_splits."""
    from benchmarks.bench_decode_attention import make_decode_batch
    from benchmarks.bench_kv_write import bench_gpu_ms
    from miniserve.kernels.decode_attention import decode_attention

    results = {}
    for (name, (batch, context, heads)), cache, splits in itertools.product(CASES.items(), CACHES, SPLITS):
        q, kc, vc, meta, (ks, vs) = make_decode_batch(device, batch, context, CACHES[cache], heads=heads)
        if batch > 1:
            lens = torch.randint(100, context + 1, (batch,), generator=torch.Generator().manual_seed(1))
            meta.seq_lens.copy_(lens.to(torch.int32))
        args = (q, kc, vc, meta, ks, vs, heads[2] ** -0.5)
        out = decode_attention(*args, decode_splits=splits)
        us = 1e3 * bench_gpu_ms(lambda: decode_attention(*args, decode_splits=splits))  # noqa: B023
        key = f"{name} {cache} {splits}"
        results[key] = (out.cpu(), us)
        print(f"{key:48s} {us:8.2f} us", flush=True)
    return results


def compare(old: dict, new: dict) -> list[dict]:
    rows = []
    for key, (out, us) in new.items():
        old_out, old_us = old[key]
        diff = (out.float() - old_out.float()).abs().max().item()
        rows.append(dict(case=key, old_us=old_us, new_us=us, speedup=old_us / us, identical=torch.equal(out, old_out),
                         max_abs_diff=diff))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]), help="the tree whose code runs")
    ap.add_argument("--save", required=True, help="where this tree's outputs and times go (torch.save)")
    ap.add_argument("--compare", default=None, help="another tree's --save file: compare against it")
    ap.add_argument("--old-commit", default=None, help="the commit of the --compare file's tree, recorded")
    ap.add_argument("--out", default=None, help="the comparison's JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.tree)
    results = run_cases(torch.device("cuda"))
    torch.save(results, args.save)
    if args.compare:
        from benchmarks.provenance import write_result

        rows = compare(torch.load(args.compare), results)
        for r in rows:
            bits = "identical" if r["identical"] else f"DIFFERS by {r['max_abs_diff']:.3g}"
            print(f"{r['case']:48s} {r['old_us']:8.2f} -> {r['new_us']:8.2f} us  x{r['speedup']:.3f}  {bits}")
        if args.out:
            write_result(args.out, {"old_commit": args.old_commit, "rows": rows})


if __name__ == "__main__":
    main()
