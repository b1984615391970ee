"""Speculative decoding throughput on the demo pair: tokens/s with and without a draft, and acceptance length.

    python benchmarks/spec_decode.py [--batch 1 8 32] [--k 2 4 6] [--max-tokens 128] [--kv-cache-dtype auto]

Greedy (or, with --temperature, seeded sampling) decoding of held-out Shakespeare passages (ignore_eos, fixed
length) so every configuration generates the same number of tokens; each configuration is warmed up once, then
timed over `--repeats` identical runs (median).
Acceptance statistics cover all timed runs. Two throughputs: end to end (prompt processing included) and decode
(tokens after each request's first one, over the time after the last first token: the per-token speed that
speculation changes, without the prefill both configurations pay).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.provenance import write_result  # noqa: E402
from miniserve import LLM, SamplingParams  # noqa: E402
from miniserve.config import DEMO_DRAFT, DEMO_TARGET  # noqa: E402

# 32 passages of the held-out 10% of the corpus (neither model trained on them), each ending at a speaker's name
PROMPTS = json.loads((Path(__file__).parent / "prompts_val.json").read_text())


def timed_generate(llm: LLM, batch: int, max_tokens: int, temperature: float = 0.0) -> tuple[float, int, float]:
    """(end-to-end seconds, generated tokens, decode seconds: from the last first token to the end)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    params = SamplingParams(temperature=temperature, seed=0, max_tokens=max_tokens, ignore_eos=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    decode_seconds = time.monotonic() - max(o.metrics["first_token_time"] for o in outs)
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs), decode_seconds


def measure(batch: int, k: int | None, args) -> dict:
    kw = dict(kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=max(64, batch), enforce_eager=args.enforce_eager)
    if k is not None:
        kw.update(speculative_model=args.draft, num_speculative_tokens=k, overlap_spec_rounds=not args.no_overlap)
    gc.collect()  # the previous configuration's engine (graphs, KV pool) goes now, not during the timed runs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    llm = LLM(str(DEMO_TARGET), **kw)
    timed_generate(llm, batch, max_tokens=16)  # warm-up: compiles kernels
    gc.collect()
    s0 = llm.engine.stats()
    runs = [timed_generate(llm, batch, args.max_tokens, args.temperature) for _ in range(args.repeats)]
    seconds, tokens, _ = sorted(runs)[len(runs) // 2]  # the median run
    decode_tps = sorted((t - batch) / d for _, t, d in runs)[len(runs) // 2]  # after each request's first token
    s1 = llm.engine.stats()
    drafts = s1["spec_num_drafts"] - s0["spec_num_drafts"]
    accepted = s1["spec_num_accepted_tokens"] - s0["spec_num_accepted_tokens"]
    per_pos = [b - a for a, b in zip(s0["spec_accepted_per_position"], s1["spec_accepted_per_position"])]
    return {
        "batch": batch,
        "k": k,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "decode_tokens_per_s": decode_tps,
        "mean_acceptance_length": (1 + accepted / drafts) if drafts else None,
        "acceptance_per_position": [x / drafts for x in per_pos] if drafts else None,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--draft", default=str(DEMO_DRAFT), help="draft model directory")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else seeded sampling")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-overlap", action="store_true", help="read each greedy round before launching the next")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per configuration; the median is kept")
    p.add_argument("--name", default="spec_decode", help="output file stem")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    rows = []
    for batch in args.batch:
        base = measure(batch, None, args)
        rows.append(base)
        for k in args.k:
            r = measure(batch, k, args)
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["decode_speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            rows.append(r)
    env = {
        "command": "python " + " ".join(sys.argv),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "kv_cache_dtype": args.kv_cache_dtype,
        "draft": args.draft,
        "temperature": args.temperature,
        "cuda_graphs": not args.enforce_eager,
        "overlap_spec_rounds": not args.no_overlap,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
    }
    write_result(Path(args.out, f"{args.name}.json"), {"env": env, "rows": rows})
    print(json.dumps(env))
    print(
        f"{'batch':>5} {'k':>4} {'tok/s':>10} {'speedup':>8} {'decode tok/s':>12} {'speedup':>8} {'accept len':>10}"
        "  per-position acceptance"
    )
    for r in rows:
        acc = f"{r['mean_acceptance_length']:.2f}" if r["mean_acceptance_length"] else "-"
        pos = " ".join(f"{x:.2f}" for x in r["acceptance_per_position"] or [])
        print(
            f"{r['batch']:>5} {str(r['k'] or '-'):>4} {r['tokens_per_s']:>10.1f} {r.get('speedup', 1.0):>8.2f} "
            f"{r['decode_tokens_per_s']:>12.1f} {r.get('decode_speedup', 1.0):>8.2f} {acc:>10}  {pos}"
        )


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


if __name__ == "__main__":
    main()
