"""Join pairs of serve.py results measured back to back in one GPU session (the same workload served before and
after a change) into one file: for each pair, both runs' ratios to offline, engine step, inter-token latency, time
to first token and time per output token (the medians of a phase's repeats' p50s), and the offline prefill.

    python benchmarks/serve_ab.py --pair NAME OLD.json NEW.json [--pair ...] --out benchmarks/results/serve_ab_h200.json
        [--keep]   # the pairs already in --out stay (a new session's pair joins the earlier ones)

`h200_suite.sh servingab` (an older tree against this one, saturated), `rate4ab` (the same at 4 requests/s) and
`parserab` (this tree on h11, then httptools) make the pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serve import median_p50  # noqa: E402  (the medians the README quotes)


def summary(run: dict) -> dict:
    """What a pair compares, from one serve.py result."""
    phases, versions = run["phases"], run["versions"]
    out = {"commit": versions["commit"], "date": versions["date"][:10], "command": run["command"]}
    for name in ("stream", "plain"):
        if name not in phases:  # a run below saturation streams only
            continue
        ph = phases[name]
        out[name] = {
            "vs_offline": ph["vs_offline"],
            "output_tok_s": ph["output_tok_s"],
            "ms_per_step": ph["ms_per_step"],
        }
        if "itl_ms" in ph:
            out[name] |= {key + "_p50_ms": median_p50(ph, key) for key in ("itl", "ttft", "tpot")}
    offline = phases["offline"]
    out["offline"] = {"output_tok_s": offline["output_tok_s"], "decode_step_ms": offline["decode_step_ms"]}
    if "single_request_prefill_ms" in offline:
        out["offline"]["single_request_prefill_ms"] = offline["single_request_prefill_ms"]
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
        print(name, {k: (p["old"][k], p["new"][k]) for k in ("stream", "plain") if k in p["old"]})
    return result


if __name__ == "__main__":
    main()
