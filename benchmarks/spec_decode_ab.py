"""Join the side-by-side runs of `h200_suite.sh demoab` into one result: the demo model's batch-1 plain and
speculative (k=4) throughput of this tree against an older one, medians over the alternated runs.

    python benchmarks/spec_decode_ab.py DIR --old-commit 432bd57 --out benchmarks/results/spec_decode_ab_h200.json

DIR holds spec_decode_{old,new}_{1,2,...}.json (benchmarks/spec_decode.py --name ...).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def tok_s(run: dict, k: int | None) -> float:
    return next(r["tokens_per_s"] for r in run["rows"] if r["k"] == k)


def join(directory: Path, old_commit: str) -> dict:
    runs = {
        p.stem.removeprefix("spec_decode_"): json.loads(p.read_text())
        for p in sorted(directory.glob("spec_decode_*_*.json"))
        if re.fullmatch(r"spec_decode_(old|new)_\d+", p.stem)  # not this script's own output beside them
    }
    if not any(name.startswith("new") for name in runs) or not any(name.startswith("old") for name in runs):
        raise SystemExit(f"{directory}: needs spec_decode_old_*.json and spec_decode_new_*.json")
    new = next(r for name, r in runs.items() if name.startswith("new"))
    median = {
        f"{tree}_{kind}": statistics.median(tok_s(r, k) for name, r in runs.items() if name.startswith(tree))
        for tree in ("old", "new")
        for kind, k in (("plain", None), ("k4", 4))
    }
    return {
        "command": f"OLD=<tree of the old commit> bash benchmarks/h200_suite.sh demoab OUT: {len(runs) // 2} rounds of "
        f"`{new['env']['command']}` (renamed per tree and round), old and new trees alternated, then "
        "benchmarks/spec_decode_ab.py",
        "commit": new["provenance"]["commit"],
        "dirty": new["provenance"]["dirty"],
        "old_commit": old_commit,
        "date": new["provenance"]["date"][:10],
        "gpu": new["env"]["gpu"],
        "torch": new["env"]["torch"],
        "triton": new["env"]["triton"],
        "median_tok_s": median,
        "new_vs_old": {kind: median[f"new_{kind}"] / median[f"old_{kind}"] for kind in ("plain", "k4")},
        "runs": {name: r["rows"] for name, r in runs.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--old-commit", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    result = join(args.dir, args.old_commit)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["new_vs_old"]))
    return result


if __name__ == "__main__":
    main()
