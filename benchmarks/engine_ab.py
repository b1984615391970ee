"""Join side-by-side throughput.py runs of two trees (`h200_suite.sh engineab`) into one result: for each
workload and run configuration (KV dtype, decode variant), this tree's output tok/s and decode step against an
older tree's, and their ratio.

    python benchmarks/engine_ab.py DIR --out benchmarks/results/engine_ab_h200.json

DIR holds throughput_{old,new}_{WORKLOAD}.json (throughput.py --out), one pair per workload, run back to back in
one session on one GPU.

    python benchmarks/engine_ab.py DIR --setting dependent_launch --out benchmarks/results/dependent_launch_h200.json

joins one tree's runs of an EngineConfig setting at its default and at other values instead (throughput.py runs
each configuration with `--dependent-launch auto off` and the like, in one process): DIR holds
throughput_setting_{WORKLOAD}.json; each row is a configuration's default run against its other run.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

KEYS = ("kv_cache_dtype", "kv_write", "decode_variant", "extend_variant", "decode_splits", "dependent_launch")


def label(run: dict) -> str:
    """A run's configuration, e.g. "fp8" or "fp8 staged"."""
    return " ".join(str(run[k]) for k in KEYS if k in run and run[k] not in ("fused", None))


def compare(old: dict, new: dict) -> list[dict]:
    """One row per configuration both trees ran, in the new run's order."""
    olds = {label(r): r for r in old["runs"]}
    rows = []
    for run in new["runs"]:
        before = olds.get(label(run))
        if before is None:
            continue
        row = {"config": label(run), "old_tok_s": before["output_tok_s"], "new_tok_s": run["output_tok_s"]}
        row["new_vs_old"] = run["output_tok_s"] / before["output_tok_s"]
        if "decode_step_ms" in run and "decode_step_ms" in before:
            row["old_decode_step_ms"], row["new_decode_step_ms"] = before["decode_step_ms"], run["decode_step_ms"]
        rows.append(row)
    return rows


def join(directory: Path, part: str = "engineab") -> dict:
    pairs: dict[str, dict] = {}
    for path in sorted(directory.glob("throughput_*_*.json")):
        found = re.fullmatch(r"throughput_(old|new)_(\w+)", path.stem)
        if found:
            pairs.setdefault(found[2], {})[found[1]] = json.loads(path.read_text())
    pairs = {w: p for w, p in pairs.items() if len(p) == 2}
    if not pairs:
        raise SystemExit(f"{directory}: needs throughput_old_WORKLOAD.json and throughput_new_WORKLOAD.json")
    first = next(iter(pairs.values()))
    return {
        "command": f"OLD=<tree of the old commit> bash benchmarks/h200_suite.sh {part} OUT, then "
        f"benchmarks/engine_ab.py OUT --part {part}",
        "commit": first["new"]["commit"],
        "dirty": first["new"]["dirty"],
        "old_commit": first["old"]["commit"],
        "date": first["new"]["date"][:10],
        "gpu": first["new"]["gpu"],
        "torch": first["new"]["torch"],
        "triton": first["new"]["triton"],
        "workloads": {
            w: {"command": p["new"]["command"], "rows": compare(p["old"], p["new"])} for w, p in pairs.items()
        },
    }


def join_setting(directory: Path, setting: str) -> dict:
    """Per workload file, each run labelled with a non-default `setting` against the default run of its
    configuration (label without the setting), as old (the other value) and new (the default)."""
    workloads = {}
    for path in sorted(directory.glob("throughput_setting_*.json")):
        result = json.loads(path.read_text())
        default = [r for r in result["runs"] if setting not in r]
        others = [r for r in result["runs"] if setting in r]
        as_default = [{k: v for k, v in r.items() if k != setting} for r in others]  # labelled like their pair
        rows = compare({"runs": as_default}, {"runs": default})
        value = {label(r): run[setting] for r, run in zip(as_default, others)}
        for row in rows:
            row["other"] = value[row["config"]]
        workloads[path.stem.removeprefix("throughput_setting_")] = {
            "command": result["command"], "commit": result["commit"], "date": result["date"], "rows": rows
        }  # fmt: skip
    if not workloads:
        raise SystemExit(f"{directory}: needs throughput_setting_WORKLOAD.json files")
    first = json.loads(next(directory.glob("throughput_setting_*.json")).read_text())
    latest = max(workloads.values(), key=lambda w: w["date"])
    return {
        "command": f"bash benchmarks/h200_suite.sh <part> OUT, then benchmarks/engine_ab.py OUT --setting {setting}",
        "commit": latest["commit"],  # the newest runs'; each workload names its own
        "dirty": any(json.loads(f.read_text()).get("dirty") for f in directory.glob("throughput_setting_*.json")),
        "date": latest["date"],
        "setting": setting,
        "rows_are": "new = the setting's default, old = the run with the value in `other`",
        **{k: first[k] for k in ("gpu", "torch", "triton")},
        "workloads": workloads,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--part", default="engineab", help="the h200_suite.sh part that ran them: engineab, samplerab")
    ap.add_argument("--setting", default=None, help="join one tree's runs of this EngineConfig setting instead")
    args = ap.parse_args(argv)
    result = join_setting(args.dir, args.setting) if args.setting else join(args.dir, args.part)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for workload, w in result["workloads"].items():
        print(workload, [(r["config"], round(r["new_vs_old"], 3)) for r in w["rows"]])
    return result


if __name__ == "__main__":
    main()
