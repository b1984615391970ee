"""EngineConfig.fp8_decode end to end on a GPU: greedy decoding of the demo model with an FP8 pool, "auto" (exact)
against "hw-staged", CUDA graphs on. Reports how many sequences are identical and where the others first differ
(the staged read differs from the exact one by at most one bf16 ulp in some attention outputs), and the decode
throughput of each.

    python benchmarks/fp8_decode_check.py [--out fp8_decode_check.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.provenance import write_result  # noqa: E402
from miniserve import LLM, SamplingParams  # noqa: E402


def run(mode: str, prompts: list[str], params: SamplingParams) -> tuple[list[list[int]], float]:
    llm = LLM(kv_cache_dtype="fp8", fp8_decode=mode)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    prompts = [f"{name}:" for name in ("ROMEO", "JULIET", "MERCUTIO", "NURSE", "FRIAR", "TYBALT", "BENVOLIO", "PARIS")]
    prompts = prompts * 8
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    exact, t_exact = run("auto", prompts, params)
    staged, t_staged = run("hw-staged", prompts, params)
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(exact, staged)]
    result = {
        "sequences": len(prompts),
        "identical": sum(x == y for x, y in zip(exact, staged)),
        "first_divergence": first,
        "tok_s_auto": sum(map(len, exact)) / t_exact,
        "tok_s_hw_staged": sum(map(len, staged)) / t_staged,
    }
    print(result)
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
