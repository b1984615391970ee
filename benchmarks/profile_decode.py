"""Where the host time of a decode step goes: cProfile over greedy generation on the demo target.

python benchmarks/profile_decode.py [--speculative] [--batch 1] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from miniserve import LLM, SamplingParams  # noqa: E402
from miniserve.config import DEMO_DRAFT  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--speculative", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    kw = dict(speculative_model=str(DEMO_DRAFT), num_speculative_tokens=4) if args.speculative else {}
    llm = LLM(**kw)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = ["ROMEO:"] * args.batch
    llm.generate(prompts, params, use_tqdm=False)
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    seconds = time.perf_counter() - start
    print(f"{args.batch * args.max_tokens / seconds:.1f} tokens/s, {1000 * seconds / args.max_tokens:.2f} ms/step")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
