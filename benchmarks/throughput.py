"""miniserve's standard offline throughput benchmark, on random-weight checkpoints of real model shapes.

    python benchmarks/throughput.py --shape qwen3-0.6b --workload nano --kv-cache-dtype auto fp8
    python benchmarks/throughput.py --shape llama-3.2-1b --workload fixed --batch 64 --prompt 512 --gen 256
    python benchmarks/throughput.py --shape llama-3.1-8b --workload latency --hf
    python benchmarks/throughput.py --shape llama-3.2-1b --workload sweep --plot throughput.png
    python benchmarks/throughput.py --shape llama-3.2-1b --workload prefix --kv-cache-dtype auto fp8

Workloads:
- `nano`: nano-vllm's benchmark: 256 sequences, prompt and output lengths uniform in 100..1024 (seed 0), random
  token ids below 10,000, temperature 0.6, ignore_eos.
- `fixed`: `--batch` sequences of `--prompt` random tokens, `--gen` greedy tokens each (ignore_eos).
- `latency`: `fixed` at batch 1.
- `sweep`: `fixed` over several batch sizes (`--batches`), with an optional PNG plot beside the roofline.
- `prefill`: time to first token of one long prompt (`--prompts 4096 16384 32768`), against one transformers
  forward pass (SDPA) over the same tokens with `--hf`.
- `prefix`: `--batch` (default 256) requests sharing a `--shared-prefix`-token system prompt (2,000), each with its
  own `--suffix`-token ending (100), `--gen` greedy tokens each (128), run with prefix caching on and off: mean
  time to first token, output throughput, the hit rate, and the ratios (targets: >= 3x lower TTFT, >= 2x
  throughput). `--speculative-model self` drafts with the target itself (both pools cache).

Each configuration is warmed up (Triton JIT, CUDA graph capture happen at start-up and in the warm-up run),
then timed `--repeats` times; the median is reported. `--rounds N` (odd) runs the whole set of configurations N times in
turn (bf16, fp8, bf16, fp8, ...: a drift of the GPU's speed then reaches each alike) and reports each number as its
median over the rounds, the rounds kept beside (`rounds`). Every timed run starts from an empty prefix cache (the runs
repeat the same prompts). For `fixed`, the decode-step time is (T(gen) - T(1)) /
(gen - 1): the same prompts with one generated token time the prefill alone. The bandwidth roofline of a run
is the time to read every weight once per step plus each sequence's KV once per step, at the measured
device-to-device copy bandwidth and at the datasheet's; prompt FLOPs are added at `--peak-tflops`.
Writes JSON (`--out`) with the command, versions and commit.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.checkpoints import SHAPES, build_checkpoint, num_parameters  # noqa: E402
from benchmarks.host_split import PLAIN, HostSplit  # noqa: E402
from benchmarks.provenance import flat as provenance  # noqa: E402
from miniserve import LLM, SamplingParams  # noqa: E402
from miniserve.config import DECODE_SPLITS, DEPENDENT_LAUNCHES  # noqa: E402

DATASHEET_GBS = {"H200": 4800, "H100": 3350}


# ---------------------------------------------------------------- workloads


def nano_workload(seed: int = 0, num_seqs: int = 256, max_in: int = 1024, max_out: int = 1024, max_id: int = 10000):
    """nano-vllm's bench.py: the same random draws in the same order (max_id < 10,000 only for tiny vocabularies)."""
    rng = random.Random(seed)
    low_in, low_out = min(100, max_in), min(100, max_out)  # (tiny CPU runs shrink the lengths)
    prompts = [[rng.randint(0, max_id) for _ in range(rng.randint(low_in, max_in))] for _ in range(num_seqs)]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(low_out, max_out))
        for _ in range(num_seqs)
    ]
    return prompts, params


def prefix_workload(num_seqs: int, shared: int, suffix: int, gen: int, seed: int = 0, max_id: int = 10000):
    """One system prompt for all, then each request's own suffix (a chat service's traffic, at its simplest)."""
    rng = random.Random(seed)
    system = [rng.randint(0, max_id) for _ in range(shared)]
    prompts = [system + [rng.randint(0, max_id) for _ in range(suffix)] for _ in range(num_seqs)]
    return prompts, [SamplingParams(temperature=0, ignore_eos=True, max_tokens=gen) for _ in range(num_seqs)]


def fixed_workload(batch: int, prompt: int, gen: int, seed: int = 0, max_id: int = 10000):
    rng = random.Random(seed)
    prompts = [[rng.randint(0, max_id) for _ in range(prompt)] for _ in range(batch)]
    return prompts, [SamplingParams(temperature=0, ignore_eos=True, max_tokens=gen) for _ in range(batch)]


# ---------------------------------------------------------------- cost model


def model_costs(cfg: dict, kv_bytes_per_elem: int) -> dict:
    """Bytes a decode step reads for the weights, KV bytes per cached token, FLOPs per prompt token."""
    params = num_parameters(cfg)
    embed = cfg["vocab_size"] * cfg["hidden_size"]
    # a step reads every matrix once; the embedding table only for its rows (unless it is also the LM head)
    weight_bytes = 2 * (params - (0 if cfg["tie_word_embeddings"] else embed))
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * d * kv_bytes_per_elem
    attn_flops_per_pair = 4 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * d  # QK^T and PV
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_per_token,
        "linear_flops_per_token": 2 * (params - embed),
        "attn_flops_per_pair": attn_flops_per_pair,
    }


def roofline_seconds(costs: dict, prompt_lens: list[int], gen_lens: list[int], gbs: float, tflops: float) -> float:
    """Every sequence decodes at once (all fit in one batch): step s reads the weights plus the KV of every
    sequence still generating at its current length; prompts cost their FLOPs."""
    seconds = 0.0
    for s in range(max(gen_lens)):
        kv = sum(p + s for p, g in zip(prompt_lens, gen_lens) if g > s) * costs["kv_bytes_per_token"]
        seconds += (costs["weight_bytes"] + kv) / (gbs * 1e9)
    flops = sum(costs["linear_flops_per_token"] * p + costs["attn_flops_per_pair"] * p * p / 2 for p in prompt_lens)
    return seconds + flops / (tflops * 1e12)


def measured_copy_gbs(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus written (median of 10)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times[2:]) / 1e9


# ---------------------------------------------------------------- running


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(llm: LLM, prompts, params) -> tuple[float, int]:
    seconds, outs = timed_outputs(llm, prompts, params)
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs)


def timed_outputs(llm: LLM, prompts, params) -> tuple[float, list]:
    llm.reset_prefix_cache()  # what an earlier run cached would turn this run's prompts into cache hits
    sync()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync()
    return time.perf_counter() - start, outs


def median_run(llm: LLM, prompts, params, repeats: int) -> tuple[float, int]:
    runs = [timed(llm, prompts, params) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), runs[0][1]


def split_run(llm: LLM, prompts, params, args) -> tuple[float, int]:
    """median_run, with the host split (`--host-split`) counting these runs only."""
    if args.split is not None:
        args.split.reset()
    return median_run(llm, prompts, params, args.repeats)


def split_result(args) -> dict:
    """The engine thread's milliseconds per step in each phase of the runs split_run timed (benchmarks/host_split.py:
    PLAIN; `wait` is the thread idle for the GPU), or nothing without `--host-split`."""
    return {} if args.split is None else {"host_ms_per_step": args.split.per_step_ms()}


def make_llm(model: Path, kv: str, args, enable_prefix_caching: bool = True, **settings) -> LLM:
    """An engine for one run; settings: EngineConfig fields a run varies (decode_splits, dependent_launch)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    kw = dict(
        kv_cache_dtype=kv,
        max_num_seqs=args.max_num_seqs,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=enable_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
        **settings,
    )
    if args.speculative_model:
        kw["speculative_model"] = str(model) if args.speculative_model == "self" else args.speculative_model
        kw["num_speculative_tokens"] = args.num_speculative_tokens
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    if args.device:
        kw["device"] = args.device
    if args.dtype:
        kw["dtype"] = args.dtype
    llm = LLM(str(model), **{k: v for k, v in kw.items() if v is not None})
    warm, warm_params = fixed_workload(min(8, args.max_num_seqs or 8), 64, 8, max_id=10)
    llm.generate([{"prompt_token_ids": p} for p in warm], warm_params, use_tqdm=False)
    return llm


def max_token_id(cfg: dict) -> int:
    return min(10000, cfg["vocab_size"] - 1)


def kv_elem_bytes(llm: LLM) -> int:
    return llm.engine.target.kv_dtype.itemsize


def workload_of(args, cfg: dict) -> tuple[list, list]:
    """The prompts and sampling params of `--workload` nano, or else of the fixed workload at --batch."""
    if args.workload == "nano":
        return nano_workload(
            num_seqs=args.nano_seqs, max_in=args.nano_len, max_out=args.nano_len, max_id=max_token_id(cfg)
        )
    return fixed_workload(args.batch, args.prompt, args.gen, max_id=max_token_id(cfg))


def run_nano(llm: LLM, cfg: dict, args, gbs: dict) -> dict:
    prompts, params = workload_of(args, cfg)
    warm = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=2) for _ in params]
    timed(llm, prompts, warm)  # JIT of every kernel these shapes reach, off the clock
    seconds, tokens = split_run(llm, prompts, params, args)
    costs = model_costs(cfg, kv_elem_bytes(llm))
    gens = [p.max_tokens for p in params]
    out = {"output_tokens": tokens, "seconds": seconds, "output_tok_s": tokens / seconds, **split_result(args)}
    for name, bw in gbs.items():
        roof = roofline_seconds(costs, [len(p) for p in prompts], gens, bw, args.peak_tflops)
        out[f"roofline_tok_s_{name}"] = tokens / roof
        out[f"pct_roofline_{name}"] = 100 * roof / seconds
    return out


def run_prefix(llm: LLM, cfg: dict, args) -> dict:
    """The prefix workload on one engine: mean TTFT (all requests arrive at once), output throughput, hit rate."""
    prompts, params = prefix_workload(args.batch, args.shared_prefix, args.suffix, args.gen, max_id=max_token_id(cfg))
    warm, _ = prefix_workload(args.batch, args.shared_prefix, args.suffix, 2, seed=1, max_id=max_token_id(cfg))
    timed(llm, warm, [SamplingParams(temperature=0, ignore_eos=True, max_tokens=2) for _ in warm])  # JIT, off clock
    runs = []
    for _ in range(args.repeats):
        before = llm.engine.stats()
        seconds, outs = timed_outputs(llm, prompts, params)
        after = llm.engine.stats()
        ttft = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs]
        queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
        hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        runs.append(
            {
                "seconds": seconds,
                "output_tokens": tokens,
                "output_tok_s": tokens / seconds,
                "mean_ttft_s": statistics.mean(ttft),
                "cached_tokens": sum(o.num_cached_tokens for o in outs),
                "prefix_cache_queries": queries,
                "prefix_cache_hits": hits,
                "hit_rate": hits / queries if queries else 0.0,
            }
        )
    median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {**median, "repeats": runs}


def prefix_comparison(on: dict, off: dict) -> dict:
    """The issue's targets: caching on gives >= 3x lower mean TTFT and >= 2x output throughput."""
    ttft_ratio = off["mean_ttft_s"] / on["mean_ttft_s"]
    tok_ratio = on["output_tok_s"] / off["output_tok_s"]
    return {
        "ttft_reduction": ttft_ratio,
        "throughput_gain": tok_ratio,
        "ttft_target_met": ttft_ratio >= 3.0,
        "throughput_target_met": tok_ratio >= 2.0,
    }


def direct_decode_step_ms(llm: LLM, prompts, gen: int) -> float:
    """Median wall time of the engine's steps once every sequence is decoding (host work included: what
    LLM.generate's host does, final outputs only)."""
    engine = llm.engine
    ids = [f"direct-{i}" for i in range(len(prompts))]
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=gen, output_kind="final_only")
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    times, finished = [], 0
    while finished < len(ids):
        decoding = all(s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running)
        decoding = decoding and not engine.scheduler.waiting
        start = time.perf_counter()
        outs = engine.step()
        if decoding:
            times.append(time.perf_counter() - start)
        finished += sum(o.finished for o in outs)
    return 1e3 * statistics.median(times[2:-2] or times)


def run_fixed(llm: LLM, cfg: dict, args, gbs: dict, batch: int) -> dict:
    prompts, params = fixed_workload(batch, args.prompt, args.gen, max_id=max_token_id(cfg))
    warm, warm_params = fixed_workload(batch, args.prompt, 2, seed=1, max_id=max_token_id(cfg))
    timed(llm, warm, warm_params)  # JIT of every kernel these shapes reach, off the clock
    seconds, tokens = split_run(llm, prompts, params, args)
    split = split_result(args)
    p1, params1 = fixed_workload(batch, args.prompt, 1, max_id=max_token_id(cfg))
    prefill_s, _ = median_run(llm, p1, params1, args.repeats)
    step = (seconds - prefill_s) / max(1, args.gen - 1)
    costs = model_costs(cfg, kv_elem_bytes(llm))
    flops = batch * (costs["linear_flops_per_token"] * args.prompt + costs["attn_flops_per_pair"] * args.prompt**2 / 2)
    mean_ctx = args.prompt + args.gen / 2
    step_bytes = costs["weight_bytes"] + batch * mean_ctx * costs["kv_bytes_per_token"]
    out = {
        "batch": batch,
        "prompt": args.prompt,
        "gen": args.gen,
        "output_tokens": tokens,
        "seconds": seconds,
        "output_tok_s": tokens / seconds,
        "prefill_seconds": prefill_s,
        "prefill_tflops": flops / prefill_s / 1e12,
        "decode_step_ms": 1e3 * step,
        "decode_step_ms_direct": direct_decode_step_ms(llm, prompts, args.gen),
        "decode_tok_s": batch / step,
        "decode_step_bytes": step_bytes,
        **split,
    }
    for name, bw in gbs.items():
        out[f"decode_step_roofline_ms_{name}"] = 1e3 * step_bytes / (bw * 1e9)
        out[f"pct_roofline_{name}"] = 100 * step_bytes / (bw * 1e9) / step
    return out


def run_prefill(llm: LLM, cfg: dict, args, length: int) -> dict:
    """Time to first token of one prompt of `length` random tokens (the prompt pass plus one sampled token)."""
    prompts, params = fixed_workload(1, length, 1, max_id=max_token_id(cfg))
    timed(llm, *fixed_workload(1, length, 1, seed=1, max_id=max_token_id(cfg)))  # warm-up at this length
    seconds, _ = median_run(llm, prompts, params, args.repeats)
    costs = model_costs(cfg, kv_elem_bytes(llm))
    flops = costs["linear_flops_per_token"] * length + costs["attn_flops_per_pair"] * length**2 / 2
    row = {"prompt": length, "ttft_s": seconds, "tflops": flops / seconds / 1e12}
    print(json.dumps(row), flush=True)
    return row


def hf_forward_seconds(model: Path, cfg: dict, lengths: list[int]) -> list[dict]:
    """One transformers forward pass (SDPA attention, no cache) over each prompt: the bar for a prompt pass."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.bfloat16, attn_implementation="sdpa")
    m = m.to("cuda").eval()
    rows = []
    with torch.inference_mode():
        for length in lengths:
            ids = torch.tensor(fixed_workload(1, length, 1, max_id=max_token_id(cfg))[0], device="cuda")
            m(ids[:, :128], logits_to_keep=1)  # warm-up
            times = []
            for _ in range(3):
                sync()
                start = time.perf_counter()
                m(ids, logits_to_keep=1)
                sync()
                times.append(time.perf_counter() - start)
            rows.append({"prompt": length, "hf_forward_s": statistics.median(times)})
    del m
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def run_hf(model: Path, args, batch: int, gen: int) -> dict:
    """transformers' generate on the same prompts (greedy, static cache where it works)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.bfloat16).to("cuda").eval()
    prompts, _ = fixed_workload(
        batch, args.prompt, gen, max_id=max_token_id(json.loads((model / "config.json").read_text()))
    )
    ids = torch.tensor(prompts, device="cuda")
    kw = dict(max_new_tokens=gen, min_new_tokens=gen, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        m.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        sync()
        start = time.perf_counter()
        m.generate(ids, **kw)
        sync()
    seconds = time.perf_counter() - start
    del m
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "batch": batch,
        "prompt": args.prompt,
        "gen": gen,
        "seconds": seconds,
        "output_tok_s": batch * gen / seconds,
    }


def host_profile(llm: LLM, args, cfg: dict) -> str:
    """The host's top functions (cumulative time) over one run of the workload."""
    import cProfile
    import io
    import pstats

    prompts, params = workload_of(args, cfg)
    prof = cProfile.Profile()
    prof.enable()
    timed(llm, prompts, params)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


def kernel_rows(prof, steps: int) -> tuple[list[dict], float]:
    """(GPU time per kernel per step, sorted, and the GPU-busy seconds) from a torch profiler run over `steps`."""
    rows, busy = [], 0.0
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t > 0:
            rows.append({"name": evt.key[:90], "calls": evt.count, "us_per_step": t / steps})
            busy += t / 1e6
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows, busy


def profile_run(llm: LLM, args, cfg: dict) -> dict:
    """GPU time per kernel over one whole run of the workload (prompt passes, steps mixing prompt chunks with
    decodes, decode steps and sampling), per engine step, against the run's wall time: says whether the GPU or the
    host sets the pace, and which kernels take the GPU's time. Final outputs only, as LLM.generate asks."""
    from dataclasses import replace

    from torch.profiler import ProfilerActivity, profile

    prompts, params = workload_of(args, cfg)
    engine = llm.engine
    engine.reset_prefix_cache()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"prof-{i}", p, replace(sp, output_kind="final_only"))
    sync()
    steps = 0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        sync()
        wall = time.perf_counter() - start
    rows, busy = kernel_rows(prof, steps)
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "gpu_ms_per_step": 1e3 * busy / steps,
            "kernels": rows[:30]}  # fmt: skip


def profile_steps(llm: LLM, args, batch: int, cfg: dict, steps: int = 8) -> dict:
    """GPU time per kernel over `steps` decode steps (prompts done), and their GPU-busy fraction; the host does
    what it does under LLM.generate (final outputs only)."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    prompts, _ = fixed_workload(batch, args.prompt, 1, max_id=max_token_id(cfg))
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=steps + 8, output_kind="final_only")
        engine.add_request(f"prof-{i}", p, params)  # final outputs only, as LLM.generate asks
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()
    engine.step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        wall = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    rows, busy = kernel_rows(prof, steps)
    return {"wall_ms_per_step": 1e3 * wall / steps, "gpu_ms_per_step": 1e3 * busy / steps, "kernels": rows[:25]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--model", help="an existing checkpoint directory instead of --shape")
    ap.add_argument("--ckpt-root", default="/tmp/miniserve-ckpts")
    ap.add_argument("--overrides", default=None, help="JSON config overrides for --shape (tiny CPU tests)")
    ap.add_argument("--workload", choices=["nano", "fixed", "latency", "sweep", "prefill", "prefix"], default="fixed")
    ap.add_argument("--prompts", type=int, nargs="+", default=[4096, 16384, 32768], help="prefill: prompt lengths")
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 64; prefix: 256)")
    ap.add_argument("--nano-seqs", type=int, default=256, help="nano: sequences (256 is the benchmark)")
    ap.add_argument("--nano-len", type=int, default=1024, help="nano: longest prompt and output (1024)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=None, help="tokens generated per sequence (default 256; prefix: 128)")
    ap.add_argument("--shared-prefix", type=int, default=2000, help="prefix: tokens of the shared system prompt")
    ap.add_argument("--suffix", type=int, default=100, help="prefix: tokens of each request's own ending")
    ap.add_argument("--speculative-model", default=None, help="a draft checkpoint, or 'self' (the target itself)")
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["auto"])
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="split the model over this many GPUs")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--rounds", type=int, default=1,
        help="run every configuration this many (an odd number of) times, alternating; each number is reported as "
        "its median over the rounds (every round's runs are kept under 'rounds')",
    )  # fmt: skip
    ap.add_argument("--peak-tflops", type=float, default=600.0, help="prompt FLOP rate assumed by the roofline")
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate (fixed/latency)")
    ap.add_argument("--hf-gen", type=int, default=32, help="tokens transformers generates (it is slow)")
    ap.add_argument(
        "--profile", action="store_true",
        help="GPU time per kernel over a short run (with --dependent-launch auto a kernel's time includes its wait "
        "for the one before: pass off for a per-kernel breakdown)",
    )  # fmt: skip
    ap.add_argument(
        "--profile-run", action="store_true", help="with --profile: over one whole run, prompts included (nano: always)"
    )
    ap.add_argument("--host-profile", action="store_true", help="cProfile of the host over one timed run")
    ap.add_argument(
        "--host-split", action="store_true", help="nano/fixed/latency/sweep: the engine thread's time per step by phase"
    )
    ap.add_argument("--kv-write", choices=["fused", "two_launch"], nargs="+", default=["fused"])
    ap.add_argument(
        "--extend-variant", nargs="+", default=["default"],
        help="extend attention launch variants (benchmarks/tune_extend_attention.py EXTEND_VARIANTS) to run each with",
    )  # fmt: skip
    ap.add_argument(
        "--decode-variant", nargs="+", default=["default"],
        help="FP8 decode attention variants (benchmarks/tune_decode_attention.py FP8_VARIANTS) for fp8 caches",
    )  # fmt: skip
    ap.add_argument(
        "--decode-splits", nargs="+", choices=list(DECODE_SPLITS), default=["by-length"],
        help="EngineConfig.decode_splits values to run each with",
    )  # fmt: skip
    ap.add_argument(
        "--dependent-launch", nargs="+", choices=list(DEPENDENT_LAUNCHES), default=["auto"],
        help="EngineConfig.dependent_launch values to run each with",
    )  # fmt: skip
    ap.add_argument("--plot", default=None, help="sweep: write a PNG of tok/s against batch size")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.hf and not torch.cuda.is_available():
        ap.error("--hf times transformers on a CUDA GPU, and there is none here")
    if args.rounds < 1 or args.rounds % 2 == 0:
        ap.error("--rounds must be odd (each number is then one round's own value, and counts stay integers)")
    if args.rounds > 1 and (args.profile or args.host_profile or args.workload == "prefix"):
        ap.error(
            "--rounds must be 1 with --profile, --host-profile or the prefix workload (one profile a "
            "configuration; the prefix workload's verdicts compare caching on and off within a round)"
        )
    if args.host_split and (args.workload in ("prefill", "prefix") or args.speculative_model):
        ap.error("--host-split times plain decoding's phases: the nano, fixed, latency and sweep workloads")
    args.split = HostSplit(PLAIN) if args.host_split else None
    prefix = args.workload == "prefix"
    args.batch = args.batch or (256 if prefix else 64)
    args.gen = args.gen or (128 if prefix else 256)
    if args.workload == "latency":
        args.batch = 1
    overrides = json.loads(args.overrides) if args.overrides else None
    model = Path(args.model) if args.model else build_checkpoint(args.shape, args.ckpt_root, overrides=overrides)
    cfg = json.loads((model / "config.json").read_text())
    if args.max_num_seqs is None:
        args.max_num_seqs = max(256, args.batch) if args.workload != "sweep" else max(args.batches)
    gbs = {}
    if torch.cuda.is_available():
        gbs["measured_copy"] = measured_copy_gbs()
        name = torch.cuda.get_device_name()
        gbs["datasheet"] = next((v for k, v in DATASHEET_GBS.items() if k in name), gbs["measured_copy"])
    else:
        gbs["assumed"] = 50.0
    result = {**provenance(), "shape": args.shape if not args.model else str(model), "workload": args.workload}
    result["tensor_parallel_size"] = args.tensor_parallel_size
    result["bandwidth_gbs"] = gbs
    rounds = [run_configs(model, cfg, args, gbs) for _ in range(args.rounds)]
    result["runs"] = rounds[0] if args.rounds == 1 else median_of_rounds(rounds)
    if args.rounds > 1:
        result["rounds"] = rounds
    if args.hf and args.workload == "prefill":
        result["hf_prefill"] = hf_forward_seconds(model, cfg, args.prompts)
        print(json.dumps(result["hf_prefill"]), flush=True)
    if args.hf and args.workload in ("fixed", "latency"):
        result["hf"] = run_hf(model, args, args.batch, args.hf_gen)
        ours = result["runs"][0]["output_tok_s"]
        result["speedup_vs_hf"] = ours / result["hf"]["output_tok_s"]
        print(json.dumps(result["hf"]), flush=True)
    if args.plot and args.workload == "sweep":
        plot_sweep(result, args.plot)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def run_configs(model: Path, cfg: dict, args, gbs: dict) -> list[dict]:
    """One run of the workload for every configuration (KV write x extend variant x decode variant x decode_splits x
    dependent_launch x KV dtype), each on an engine built for it; the launchers are the defaults again afterwards."""
    prefix = args.workload == "prefix"
    runs = []
    configs = itertools.product(
        args.kv_write, args.extend_variant, args.decode_variant, args.decode_splits, args.dependent_launch
    )
    for kv_write, variant, decode_variant, splits, dependent in configs:
        settings = {"decode_splits": splits, "dependent_launch": dependent}
        set_kv_write(kv_write)
        set_extend_variant(variant)
        set_decode_variant(decode_variant)
        for kv in args.kv_cache_dtype:
            if decode_variant != "default" and kv == "auto":
                continue  # the FP8 variants change nothing for a bf16 cache
            if prefix:
                runs.append(run_prefix_on_off(model, kv, cfg, args, settings))
                continue
            llm = make_llm(model, kv, args, **settings)
            run = {"kv_cache_dtype": kv, "kv_write": kv_write, "kv_dtype": str(llm.engine.target.kv_dtype)}
            if variant != "default":
                run["extend_variant"] = variant
            if decode_variant != "default":
                run["decode_variant"] = decode_variant
            label_settings(run, llm)
            if args.workload == "nano":
                run |= run_nano(llm, cfg, args, gbs)
            elif args.workload == "prefill":
                run["prefill"] = [run_prefill(llm, cfg, args, n) for n in args.prompts]
            elif args.workload in ("fixed", "latency"):
                run |= run_fixed(llm, cfg, args, gbs, args.batch)
            else:
                run["sweep"] = [run_fixed(llm, cfg, args, gbs, b) for b in args.batches]
            if args.profile:
                whole = args.workload == "nano" or args.profile_run
                run["profile"] = profile_run(llm, args, cfg) if whole else profile_steps(llm, args, args.batch, cfg)
            if args.host_profile:
                run["host_profile"] = host_profile(llm, args, cfg)
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k not in ("profile", "host_profile")}), flush=True)
            if "profile" in run:
                prof = run["profile"]
                print(
                    f"  decode step: wall {prof['wall_ms_per_step']:.3f} ms, GPU busy {prof['gpu_ms_per_step']:.3f} ms"
                )
                for row in prof["kernels"][:20]:
                    print(f"  {row['us_per_step']:9.1f} us/step {row['calls']:6d}  {row['name']}")
            print(run.get("host_profile", "")[-3500:])
            llm.shutdown()  # the other tensor-parallel ranks, before the next configuration starts its own
            del llm
    set_kv_write("fused")
    set_extend_variant("default")
    set_decode_variant("default")
    return runs


def median_of_rounds(rounds: list[list[dict]]) -> list[dict]:
    """`--rounds` (odd): each run's numbers as their median over the rounds, field by field (a sweep's points and a
    prefill's prompts alike), each one round's own value. Each round runs every configuration once, so the
    configurations alternate, and a drift in the GPU's speed over the minutes of a run reaches all of them alike
    rather than the ones run last."""
    return [_median_fields(same) for same in zip(*rounds, strict=True)]


def _median_fields(values: tuple):
    first = values[0]
    if isinstance(first, dict):
        return {key: _median_fields(tuple(v[key] for v in values)) for key in first}
    if isinstance(first, list) and all(isinstance(v, list) and len(v) == len(first) for v in values):
        return [_median_fields(tuple(v[i] for v in values)) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(values)
    return first


def label_settings(run: dict, llm: LLM) -> None:
    """A run with decode_splits or dependent_launch other than the default says so: what the engine was built with."""
    config = llm.engine.config
    if config.decode_splits != "by-length":
        run["decode_splits"] = config.decode_splits
    if config.dependent_launch != "auto":
        run["dependent_launch"] = config.dependent_launch


def run_prefix_on_off(model: Path, kv: str, cfg: dict, args, settings: dict) -> dict:
    run: dict = {"kv_cache_dtype": kv}
    for caching in (True, False):
        llm = make_llm(model, kv, args, enable_prefix_caching=caching, **settings)
        run["kv_dtype"] = str(llm.engine.target.kv_dtype)
        label_settings(run, llm)
        r = run_prefix(llm, cfg, args)
        run["caching_on" if caching else "caching_off"] = r
        print(
            f"[prefix {kv}, caching {'on' if caching else 'off'}] mean TTFT {1e3 * r['mean_ttft_s']:.1f} ms, "
            f"{r['output_tok_s']:.0f} output tok/s, {r['seconds']:.2f} s; [prefix cache] hit rate "
            f"{r['hit_rate']:.1%} ({r['prefix_cache_hits']} of {r['prefix_cache_queries']} tokens)",
            flush=True,
        )
        llm.shutdown()
        del llm
    run |= prefix_comparison(run["caching_on"], run["caching_off"])
    print(json.dumps({k: v for k, v in run.items() if not k.startswith("caching_")}), flush=True)
    return run


def set_kv_write(kind: str) -> None:
    """Swap the KV write the model calls: the fused cast+store kernel, or a cast then a scatter (two launches)."""
    from benchmarks.kv_write_variants import reshape_and_cache_two_launch
    from miniserve.kernels import reshape_and_cache
    from miniserve.models import llama

    llama.reshape_and_cache = reshape_and_cache if kind == "fused" else reshape_and_cache_two_launch


_EXTEND_LAUNCHER = {}


def set_extend_variant(name: str) -> None:
    """Swap the extend attention launcher that prompt chunks call (kernels/ops.py imports it at each call) for one
    with an EXTEND_VARIANTS entry's launch parameters. In this process only: tensor-parallel workers keep the
    default."""
    import miniserve.kernels.extend_attention as ext
    from benchmarks.tune_extend_attention import EXTEND_VARIANTS

    original = _EXTEND_LAUNCHER.setdefault("default", ext.extend_attention)
    kw = EXTEND_VARIANTS[name]
    ext.extend_attention = functools.partial(original, **kw) if kw else original


_DECODE_LAUNCHER = {}


def set_decode_variant(name: str) -> None:
    """Swap the decode attention launcher (kernels/ops.py imports it at each call) for one that launches FP8
    caches with an FP8_VARIANTS entry's parameters; bf16 caches keep the default. In this process only."""
    import miniserve.kernels.decode_attention as dec
    from benchmarks.tune_decode_attention import FP8_VARIANTS

    original = _DECODE_LAUNCHER.setdefault("default", dec.decode_attention)
    kw = FP8_VARIANTS[name]

    def launch(q, key_cache, *args, **kwargs):
        if key_cache.element_size() == 1:
            kwargs = {**kwargs, **kw}
        return original(q, key_cache, *args, **kwargs)

    dec.decode_attention = launch if name != "default" else original


def plot_sweep(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    roofs = set()  # one roofline per KV dtype, whatever the runs' other settings
    for run in result["runs"]:
        xs = [r["batch"] for r in run["sweep"]]
        kv = run["kv_dtype"].removeprefix("torch.")
        splits = "".join(f", {k.replace('_', ' ')} {run[k]}" for k in ("decode_splits", "dependent_launch") if k in run)
        # the median step once every sequence decodes: (run - prefill run) / steps is noisy where prompt chunks
        # and decodes share steps (batch 256: 2.5 to 4.8 ms a step between runs whose median steps are 3.0-3.2 ms)
        tok_s = [1e3 * r["batch"] / r["decode_step_ms_direct"] for r in run["sweep"]]
        ax.plot(xs, tok_s, "o-", label=f"miniserve, KV {kv}{splits}")
        bw = "measured_copy" if "measured_copy" in result["bandwidth_gbs"] else "assumed"
        if kv not in roofs:
            roofs.add(kv)
            roof = [r["batch"] / (r[f"decode_step_roofline_ms_{bw}"] / 1e3) for r in run["sweep"]]
            ax.plot(xs, roof, "--", label=f"roofline ({bw} bandwidth), KV {kv}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens / s (median step)")
    ax.set_title(f"{result['shape']} decode, {result.get('gpu', 'cpu')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
