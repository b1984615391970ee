"""Join pairs of serve.py results measured back to back in one GPU session (the same saturated workload served
before and after a change) into one file: for each pair, both runs' ratios to offline, engine step, inter-token
latency and time to first token.

    python benchmarks/serve_ab.py --pair NAME OLD.json NEW.json [--pair ...] --out benchmarks/results/serve_ab_h200.json
        [--keep]   # the pairs already in --out stay (a new session's pair joins the earlier ones)

`h200_suite.sh servingab` (an older tree against this one) and `parserab` (this tree on h11, then httptools) make
the pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summary(run: dict) -> dict:
    """What a pair compares, from one serve.py result."""
    phases, versions = run["phases"], run["versions"]
    out = {"commit": versions["commit"], "date": versions["date"][:10], "command": run["command"]}
    for name in ("stream", "plain"):
        ph = phases[name]
        out[name] = {
            "vs_offline": ph["vs_offline"],
            "output_tok_s": ph["output_tok_s"],
            "ms_per_step": ph["ms_per_step"],
        }
        if "itl_ms" in ph:
            out[name] |= {"itl_p50_ms": ph["itl_ms"]["p50"], "ttft_p50_ms": ph["ttft_ms"]["p50"]}
    offline = phases["offline"]
    out["offline"] = {"output_tok_s": offline["output_tok_s"], "decode_step_ms": offline["decode_step_ms"]}
    return out


def join(pairs: list[tuple[str, dict, dict]], kept: dict | None = None) -> dict:
    last = pairs[-1][2]["versions"]
    joined = dict(kept or {})
    joined.update({name: {"old": summary(old), "new": summary(new)} for name, old, new in pairs})
    return {
        "command": "benchmarks/serve_ab.py over the pairs' serve.py results (each pair's own commands below)",
        "commit": last["commit"],
        "dirty": last["dirty"],
        "date": last["date"][:10],
        "gpu": last["gpu"],
        "torch": last["torch"],
        "triton": last["triton"],
        "pairs": joined,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", nargs=3, action="append", required=True, metavar=("NAME", "OLD", "NEW"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", action="store_true", help="keep the pairs already in --out")
    args = ap.parse_args(argv)
    pairs = [
        (name, json.loads(Path(old).read_text()), json.loads(Path(new).read_text())) for name, old, new in args.pair
    ]
    kept = json.loads(args.out.read_text())["pairs"] if args.keep and args.out.exists() else None
    result = join(pairs, kept)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, p in result["pairs"].items():
        print(
            name,
            {
                k: (round(p["old"][k]["vs_offline"], 3), round(p["new"][k]["vs_offline"], 3))
                for k in ("stream", "plain")
            },
        )
    return result


if __name__ == "__main__":
    main()
