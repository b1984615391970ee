"""Where the time of a speculative round goes on the GPU, against a plain decode step.

    python benchmarks/profile_spec.py [--k 4] [--max-tokens 128] [--draft PATH]

Prints (and writes to $OUT/profile_spec.json):
- the GPU time of one replay of each captured CUDA graph at batch 1 (target decode, draft decode, the whole greedy
  speculative round), timed with CUDA events over many back-to-back replays, and the kernels per replay;
- for greedy generation at batch 1, plain and speculative: wall time per generated token, and how much of it the
  GPU was busy (sum of kernel times from torch.profiler), so host overhead shows as the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.provenance import write_result  # noqa: E402
from miniserve import LLM, SamplingParams  # noqa: E402
from miniserve.config import DEMO_DRAFT, DEMO_TARGET  # noqa: E402

PROMPTS = json.loads((Path(__file__).parent / "prompts_val.json").read_text())


def replay_us(graph: torch.cuda.CUDAGraph, iters: int = 300) -> float:
    for _ in range(20):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / iters


def gpu_kernels(fn) -> tuple[float, int, list[tuple[str, float, int]]]:
    """(total kernel µs, kernel count, top kernels) of what fn launches."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time)
    top = sorted(((n, sum(t), len(t)) for n, t in by_name.items()), key=lambda x: -x[1])[:40]
    return total, len(kernels), top


def host_launch_us(graph: torch.cuda.CUDAGraph, iters: int = 50) -> dict:
    """Host time of launching a replay (no waiting: the GPU queue absorbs the work), and of an event record."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    event = torch.cuda.Event()
    t2 = time.perf_counter()
    for _ in range(iters):
        event.record()
    t3 = time.perf_counter()
    return {"replay_launch_us": 1e6 * (t1 - t0) / iters, "event_record_us": 1e6 * (t3 - t2) / iters}


def timed_host_phases(llm: LLM, max_tokens: int) -> dict:
    """Wall time per engine step spent in each phase (perf_counter around the engine's methods)."""
    eng = llm.engine
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}

    def wrap(obj, name: str, label: str):
        fn = getattr(obj, name)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - t
                calls[label] = calls.get(label, 0) + 1

        setattr(obj, name, timed)

    wrap(eng, "step", "step")
    wrap(eng.scheduler, "schedule", "schedule")
    wrap(eng.outputs, "collect", "collect_outputs")
    wrap(eng.target, "forward", "target.forward")
    wrap(eng.outputs, "append_sampled", "append_tokens")
    spec = eng.decoder if eng.draft is not None else None
    if spec is None:
        wrap(eng.decoder, "sampling_batch", "sampling_batch")
    else:
        wrap(spec.sampled, "sampling_batch", "sampling_batch")
        wrap(spec, "_prefill", "spec.prefill (both models)")
        wrap(spec.greedy, "run", "spec.round launch")
        wrap(spec, "_read", "spec.read overlapped round (incl. wait)")
        wrap(spec, "_emit", "spec.append")
        if spec.greedy.graphs is not None:
            wrap(spec.greedy.graphs, "run", "spec.graphs.run")
    start = time.perf_counter()
    wall, tokens = generate(llm, max_tokens)
    total = time.perf_counter() - start
    del wall
    phases = {k: f"{1000 * v:.2f} ms / {calls[k]}" for k, v in totals.items()}
    return {"tokens": tokens, "wall_ms": round(1000 * total, 2), **phases}


def generate(llm: LLM, max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start, len(out[0].outputs[0].token_ids)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--draft", default=str(DEMO_DRAFT))
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    import triton

    result: dict = {
        "command": "python " + " ".join(sys.argv),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "k": args.k,
    }
    spec = LLM(str(DEMO_TARGET), speculative_model=args.draft, num_speculative_tokens=args.k, max_num_seqs=8)
    plain = LLM(str(DEMO_TARGET), max_num_seqs=8)
    graphs = {
        "target_decode": spec.engine.target.graphs[1].graphs[1].graph,
        "draft_decode": spec.engine.draft.graphs[1].graphs[1].graph,
        f"greedy_round_k{args.k}": spec.engine.decoder.greedy.graphs.graphs[1].graph,
    }
    result["replay_us"] = {}
    for name, g in graphs.items():
        us = replay_us(g)
        total, count, _ = gpu_kernels(g.replay)
        result["replay_us"][name] = {"us": us, "kernel_us": total, "kernels": count}
        print(f"{name:>20}: {us:7.1f} µs per replay, {count} kernels, {total:.1f} µs of kernel time")
    for name, llm in (("plain", plain), ("spec", spec)):
        generate(llm, 16)
        walls = sorted(generate(llm, args.max_tokens) for _ in range(5))
        wall, tokens = walls[2]
        total, count, top = gpu_kernels(lambda llm=llm: generate(llm, args.max_tokens))
        steps = tokens if name == "plain" else None
        result[name] = {
            "ms_per_token": 1000 * wall / tokens,
            "tokens_per_s": tokens / wall,
            "gpu_busy_ms_per_token": total / 1000 / tokens,
            "kernels_per_token": count / tokens,
            "steps": steps,
            "top_kernels": top,
        }
        print(
            f"{name}: {1000 * wall / tokens:.3f} ms/token ({tokens / wall:.0f} tok/s), GPU busy "
            f"{total / 1000 / tokens:.3f} ms/token, {count / tokens:.0f} kernels/token"
        )
        for n, t, c in top[:25]:
            print(f"   {t / tokens:8.2f} µs/token  x{c / tokens:5.1f}  {n}")
    for name, llm in (("plain", plain), ("spec", spec)):
        result[f"host_phases_ms_{name}"] = timed_host_phases(llm, args.max_tokens)
        print(name, "host phases (ms over the run):", result[f"host_phases_ms_{name}"])
    for name, g in graphs.items():
        result["replay_us"][name].update(host_launch_us(g))
        print(name, result["replay_us"][name])
    s = spec.engine.stats()
    result["spec_mean_acceptance_length"] = 1 + s["spec_num_accepted_tokens"] / s["spec_num_drafts"]
    print(f"mean acceptance length {result['spec_mean_acceptance_length']:.2f}")
    write_result(Path(args.out, "profile_spec.json"), result)


if __name__ == "__main__":
    main()
