"""The first burst after start-up, step by step: what a new server pays once (Triton compiles, allocator growth,
first launches) beside the same burst again.

    python benchmarks/first_steps.py --out benchmarks/results/first_steps_h200.json [--repo OTHER_TREE]

serve.py's workload on the Llama-3.2-1B shape, offline: 8 warm-up prompts (as serve.py's warm-up), then 256
prompts of 512 random ids (32 new tokens each) added at once and stepped to the end, twice. Each step is timed
between synchronizations; a step slower than 45 ms (a full 8192-token prompt chunk takes ~35 ms on an H200), or
one that compiled a kernel (a new entry in the Triton cache, which starts empty), is listed. `--repo` runs another
tree's engine (an A/B against the commit before a change). GPU only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLOW_S = 0.045


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(REPO), help="the tree whose engine runs (default: this one)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="triton-cache-")  # empty: every compile in this run shows up
    os.environ["TRITON_CACHE_DIR"] = cache
    sys.path[:0] = [args.repo, str(REPO)]
    import torch

    from benchmarks.checkpoints import build_checkpoint
    from benchmarks.provenance import flat
    from miniserve import LLM, SamplingParams

    llm = LLM(str(build_checkpoint("llama-3.2-1b", "/tmp/miniserve-ckpts")))
    rng = random.Random(20)
    warm = [[rng.randrange(1000) for _ in range(512)] for _ in range(8)]
    llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    rounds = [run_burst(llm.engine, rng, args.gen, r, cache) for r in range(args.rounds)]
    result = {**flat(), "repo": args.repo, "rounds": rounds}
    for r in rounds:
        print(f"round {r['round']}: {r['steps']} steps, {r['seconds_in_steps']:.3f} s; slow: {r['slow_steps']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def run_burst(engine, rng: random.Random, gen: int, r: int, cache: str) -> dict:
    """256 new prompts at once, stepped to the end; every step's time, the slow ones and what they compiled."""
    import torch

    from miniserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    for i in range(256):
        engine.add_request(f"burst{r}-{i}", [rng.randrange(1000) for _ in range(512)], params)
    entries = lambda: set(glob.glob(f"{cache}/*/*.json"))  # noqa: E731
    times, slow = [], []
    while engine.has_unfinished_requests():
        before, reserved = entries(), torch.cuda.memory_reserved()
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        compiled = sorted({Path(p).stem for p in entries() - before if not Path(p).stem.startswith("__grp__")})
        if dt > SLOW_S or compiled:
            grown = (torch.cuda.memory_reserved() - reserved) / 2**20
            slow.append({"step": len(times), "ms": round(dt * 1e3, 1), "tokens": engine.last_step_num_tokens,
                         "compiled": compiled, "reserved_mib": round(grown)})  # fmt: skip
        times.append(dt)
    return {"round": r, "steps": len(times), "seconds_in_steps": sum(times), "slow_steps": slow}


if __name__ == "__main__":
    main()
