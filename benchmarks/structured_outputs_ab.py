"""Join structured_outputs.py results measured back to back in one GPU session (the same workload before and after
a change, alternated) into one file: each run's commit, its constrained/unconstrained ratios and throughputs.

    python benchmarks/structured_outputs_ab.py --pair NAME OLD.json NEW.json [--pair ...] --out OUT.json

`h200_suite.sh grammarab` makes the pairs. The ratio of a run is measured inside that run (its own unconstrained
decoding), so the pairs compare ratios, and the medians over the pairs are what the README quotes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.provenance import write_result  # noqa: E402


def summary(run: dict) -> dict:
    """What a pair compares, from one structured_outputs.py result."""
    runs = {k: v for k, v in run.items() if isinstance(v, dict) and "tokens_per_second" in v}
    return {
        "commit": run["provenance"]["commit"],
        "command": run["provenance"]["command"],
        "device": run["provenance"]["device"],
        "versions": run["provenance"]["versions"],
        "vocabulary": run["vocabulary"]["like"],
        "ratios": run["ratios"],
        "tokens_per_second": {k: v["tokens_per_second"] for k, v in runs.items()},
    }


def medians(pairs: dict) -> dict:
    """Per side, the median over the pairs of each ratio."""
    out = {}
    for side in ("old", "new"):
        names = pairs[next(iter(pairs))][side]["ratios"]
        out[side] = {n: statistics.median(p[side]["ratios"][n] for p in pairs.values()) for n in names}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", nargs=3, action="append", required=True, metavar=("NAME", "OLD", "NEW"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    pairs = {}
    for name, old, new in args.pair:
        pairs[name] = {side: summary(json.loads(Path(f).read_text())) for side, f in (("old", old), ("new", new))}
    result = {"pairs": pairs, "median_ratios": medians(pairs)}
    for side, ratios in result["median_ratios"].items():
        print(side, {k: round(v, 3) for k, v in ratios.items()})
    last = pairs[args.pair[-1][0]]["new"]
    write_result(args.out, result, measured_on={"device": last["device"], "versions": last["versions"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
