"""Mutation testing of the core modules with mutmut: how many small bugs planted in the code the tests catch.

    pip install -e ".[dev]"
    python scripts/mutation.py block_manager          # one module (minutes); several names, or none for all
    python scripts/mutation.py --list                 # the modules and the tests each one runs
    python scripts/mutation.py --results /tmp/r.json sampler   # a confirming re-run, scores written elsewhere

Each module runs in its own throw-away copy of the working tree (tracked and untracked files, uncommitted edits
included), with mutmut told to mutate that one file and to run only the tests listed for it (mutmut runs, for
each mutant, the selected tests that reach the mutated function). A mutant is *killed* when a test fails,
*survives* when all pass. Timeouts count as killed (the mutant hangs the code: a test that hung would have been
noticed; the limit is (the tests' time + 60 s) x 3 of CPU, and 6 GB of address space stops a mutant that loops
appending); "no tests" mutants sit in functions the selection never calls, and count as survivors. FUNCTIONS
narrows a module to some of its functions.
The score per module goes to scripts/mutation_results.json, the survivors' diffs to stdout; scripts/README.md
records the scores. Not in CI: a full run is an hour or more of CPU.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "mutation_results.json"

# module -> (file, pytest arguments selecting its tests)
ENGINE_TESTS = ["tests/test_boundaries.py", "tests/test_engine.py"]
NOT_SLOW = "not triton_backend and not match_transformers and not fp8_logits"  # kernel comparisons: slow, off-topic
MODULES = {
    "block_manager": (
        "miniserve/scheduler/block_manager.py",
        ["tests/test_block_manager.py", *ENGINE_TESTS, "tests/test_prefix_cache.py", "-k", NOT_SLOW],
    ),
    "scheduler": (
        "miniserve/scheduler/scheduler.py",
        ["tests/test_scheduler.py", *ENGINE_TESTS, "tests/test_prefix_cache.py", "-k", NOT_SLOW],
    ),
    "sampler": ("miniserve/engine/sampler.py", ["tests/test_sampling.py", "tests/test_sampler_edges.py"]),
    "fp8": ("miniserve/kernels/fp8.py", ["tests/test_fp8_cache_write.py", "-k", "reference or corner or dequantize"]),
    "rejection": (
        "miniserve/spec_decode/rejection.py",
        ["tests/test_rejection.py", "tests/test_spec_decode.py", "-k", "rejection or distri"],
    ),
    "greedy_accept": ("miniserve/kernels/greedy_accept.py", ["tests/test_greedy_accept.py"]),
    "stops": (
        "miniserve/engine/output_processor.py",
        ["tests/test_stop_rules.py", "tests/test_stop_strings.py", "tests/test_output_kinds.py", *ENGINE_TESTS]
        + ["-k", "not triton and not fp8"],
    ),
    "stop_strings": ("miniserve/engine/stop_strings.py", ["tests/test_stop_strings.py"]),
}
# module -> the functions mutated (mutmut name globs), where not the whole file: output_processor.py is mostly
# output building (468 mutants); its stop handling is these four
FUNCTIONS = {
    "stops": ["*ǁappend_token__mutmut_*", "*ǁ_check_stop__mutmut_*", "*ǁ_finish__mutmut_*", "*x__detokenize_at_end__*"],
}
KILLED = {"killed", "timeout", "caught by type check", "segfault"}
MEMORY_LIMIT = 6 << 30  # bytes of address space per process: a mutant that loops appending dies of MemoryError


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def working_tree_copy(dest: Path) -> None:
    """The tracked and untracked (not ignored) files of the working tree, as they are on disk."""
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def mutmut_config(path: str, tests: list[str]) -> str:
    return f"""
[tool.mutmut]
source_paths = ["miniserve"]
only_mutate = ["{path}"]
pytest_add_cli_args_test_selection = {json.dumps(tests)}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
also_copy = ["tests", "data", "server.py"]
process_isolation = "forkserver"
timeout_constant = 60.0
timeout_multiplier = 3.0
"""


def run_module(name: str, max_children: int) -> dict:
    path, tests = MODULES[name]
    functions = FUNCTIONS.get(name, [])
    with tempfile.TemporaryDirectory(prefix=f"mutation-{name}-") as tmp:
        work = Path(tmp)
        working_tree_copy(work)
        with open(work / "pyproject.toml", "a") as f:
            f.write(mutmut_config(path, tests))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["OMP_NUM_THREADS"] = "1"
        env["MINISERVE_TEST_CACHE"] = str(work / ".fixtures")  # the tiny checkpoints, built once for all mutants
        run = ["mutmut", "run", "--max-children", str(max_children), *functions]
        subprocess.run(run, cwd=work, env=env, check=False, preexec_fn=limit_memory)
        listing = subprocess.run(
            ["mutmut", "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True, check=True
        ).stdout
        statuses = dict(line.strip().rsplit(": ", 1) for line in listing.splitlines() if ": " in line)
        if functions:  # the other functions' mutants were not run
            statuses = {m: s for m, s in statuses.items() if any(fnmatch.fnmatch(m, f) for f in functions)}
        survivors = sorted(m for m, s in statuses.items() if s not in KILLED)
        for mutant in survivors:
            show = subprocess.run(["mutmut", "show", mutant], cwd=work, env=env, capture_output=True, text=True)
            print(show.stdout)
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    killed = sum(n for s, n in counts.items() if s in KILLED)
    return {
        "file": path + (f" ({len(functions)} functions: {', '.join(functions)})" if functions else ""),
        "tests": " ".join(tests),
        "mutants": len(statuses),
        "killed": killed,
        "score": round(killed / max(1, len(statuses)), 3),
        "by_status": counts,
        "survivors": survivors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"where the scores go (default {RESULTS})")
    args = parser.parse_args()
    if args.list:
        for name, (path, tests) in MODULES.items():
            only = f" (only {' '.join(FUNCTIONS[name])})" if name in FUNCTIONS else ""
            print(f"{name:14} {path:42}{only} pytest {' '.join(tests)}")
        return
    unknown = set(args.modules) - set(MODULES)
    if unknown:
        parser.error(f"unknown module(s) {sorted(unknown)}; choose from {list(MODULES)}")
    if shutil.which("mutmut") is None:
        sys.exit('mutmut is not installed: pip install -e ".[dev]"')
    for name in args.modules or list(MODULES):
        result = run_module(name, args.max_children)
        results = json.loads(args.results.read_text()) if args.results.exists() else {}  # read now: may be edited
        results[name] = result  # a re-run replaces the module's entry, "after_new_tests" included
        args.results.write_text(json.dumps(results, indent=1) + "\n")
        r = results[name]
        print(f"== {name}: {r['killed']}/{r['mutants']} killed ({r['score']:.0%}); {r['by_status']}", flush=True)


if __name__ == "__main__":
    main()
