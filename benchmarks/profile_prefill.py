"""Prompt-processing time at batch 1 on the demo pair: the whole prompt step, and each worker's forward.

    python benchmarks/profile_prefill.py [--enforce-eager] [--out profile_prefill.json]

Times `generate(max_tokens=1)` on the first benchmark passage (median of 8, after a warm-up), plain and with the
demo draft, then each worker's `forward` inside the speculative prompt step (synchronised around the call).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.provenance import write_result  # noqa: E402
from miniserve import LLM, SamplingParams  # noqa: E402
from miniserve.config import DEMO_DRAFT, DEMO_TARGET  # noqa: E402

PROMPT = json.loads((Path(__file__).parent / "prompts_val.json").read_text())[0]
ONE_TOKEN = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def prompt_step_ms(llm: LLM, repeats: int = 8) -> float:
    llm.generate([PROMPT], ONE_TOKEN, use_tqdm=False)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([PROMPT], ONE_TOKEN, use_tqdm=False)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[repeats // 2]


def time_forwards(llm: LLM) -> dict[str, float]:
    """Each worker's forward in one speculative prompt step, in ms."""
    result = {}
    for worker in llm.engine.workers:
        original = worker.forward

        def timed(inputs, original=original, role=worker.role):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = original(inputs)
            torch.cuda.synchronize()
            result[f"{role}.forward_ms"] = 1000 * (time.perf_counter() - start)
            return out

        worker.forward = timed
    llm.generate([PROMPT], ONE_TOKEN, use_tqdm=False)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", help="also write the result (with its provenance) to this JSON file")
    args = p.parse_args()
    plain = LLM(str(DEMO_TARGET), enforce_eager=args.enforce_eager)
    spec = LLM(str(DEMO_TARGET), speculative_model=str(DEMO_DRAFT), enforce_eager=args.enforce_eager)
    result = {
        "command": "python " + " ".join(sys.argv),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "prompt_tokens": len(plain.get_tokenizer().encode(PROMPT)),
        "plain_prompt_step_ms": prompt_step_ms(plain),
        "spec_prompt_step_ms": prompt_step_ms(spec),
        **time_forwards(spec),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
