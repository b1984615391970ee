"""Render the performance tables of README.md and benchmarks/results/README.md from the result files.

    python scripts/render_results.py          # rewrite the marked blocks in place
    python scripts/render_results.py --check  # exit 1 if a README differs from its rendering (a CPU test runs this)

A block is the text between `<!-- render:NAME -->` and `<!-- /render:NAME -->`; every number in it comes from a
JSON file under benchmarks/results/, so a README never drifts from its measurements. `BLOCKS` (at the end) maps
each README's blocks to the functions that render them; every table of the results README and of the README's
Performance section is such a block (tests/test_results_render.py checks both). Text that explains a number
(why a target is missed) is written here, beside the code that reads the number.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WHY_LINK = "benchmarks/results/README.md#why-each-target-stands-where-it-does"  # the heading of render_throughput_why
sys.path.insert(0, str(ROOT))

from benchmarks.checkpoints import SHAPES  # noqa: E402  (the shapes' layer counts and vocabularies)
from benchmarks.engine_ab import label as run_label  # noqa: E402  (KV dtype, KV write, variants, decode splits)
from benchmarks.serve import median_p50  # noqa: E402  (the latency ratios serve.py computed: the same medians)
from miniserve.kernels.dependent_launch import DEPENDENT_MAX_TOKENS  # noqa: E402  (the passes launched so)


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def runs_by_kv(result: dict) -> dict[str, dict]:
    """The default configuration's run per KV dtype (runs with an FP8 decode variant or the by-batch decode splits
    are apart: variant_run, by_batch_runs)."""
    return {r["kv_cache_dtype"]: r for r in result["runs"] if "decode_variant" not in r and "decode_splits" not in r}


def by_batch_runs(result: dict | None) -> dict[str, dict]:
    """The runs with decode_splits="by-batch" per KV dtype (empty where the file has none)."""
    runs = result["runs"] if result else []
    return {r["kv_cache_dtype"]: r for r in runs if r.get("decode_splits") == "by-batch"}


def variant_run(result: dict, variant: str) -> dict | None:
    """The run with an FP8 decode variant (tune_decode_attention.FP8_VARIANTS), if the file has one."""
    return next((r for r in result["runs"] if r.get("decode_variant") == variant), None)


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


class Row(NamedTuple):
    """One target of the README's Performance table. `gist` is the README's one-line reason; `why` holds the runs and
    profiles behind it, rendered in full in benchmarks/results/README.md."""

    target: str
    measured: str
    met: str
    why: str
    gist: str


# ---------------------------------------------------------------- throughput targets (issue: real-model throughput)


def throughput_rows() -> list[Row]:
    """The table's rows; a row whose result file is missing says so."""
    rows = []
    nano = load("throughput_nano_h200.json")
    if nano:
        kv = runs_by_kv(nano)
        bf16, fp8 = kv["auto"], kv["fp8"]
        rows.append(
            Row(
                "`nano` (Qwen3-0.6B shape), bf16 KV: >= 20,000 output tok/s",
                f"{fmt(bf16['output_tok_s'])} tok/s ({fmt(bf16['pct_roofline_measured_copy'])}% of the roofline)",
                "yes" if bf16["output_tok_s"] >= 20000 else f"no ({fmt(100 * bf16['output_tok_s'] / 20000)}%)",
                "overlapped decoding goes on past sequences that end by length (nano's output lengths end one every "
                "few steps; each used to stop the overlap and idle the GPU while the host caught up); "
                + sampler_note()
                + run_profile("profile_run_nano_h200.json", "auto"),
                "decoding stays overlapped past sequences that end by length, and temperature sampling is one "
                "Gumbel-max kernel over the logits",
            )
        )
        ratio = fp8["output_tok_s"] / bf16["output_tok_s"]
        others = ""
        for variant, what in (("hw", 'the byte read (`fp8_decode="hw"`, the default before)'),
                              ("staged", 'opt-in `fp8_decode="hw-staged"`')):  # fmt: skip
            run = variant_run(nano, variant)
            if run:
                times = run["output_tok_s"] / bf16["output_tok_s"]
                others += f"; {what}: {fmt(run['output_tok_s'])} tok/s = {times:.2f}x"
        rows.append(
            Row(
                "`nano`, fp8 KV: >= 1.3x the bf16 run",
                f"{fmt(fp8['output_tok_s'])} tok/s = {ratio:.2f}x{others}{nano_splits_note()}",
                "yes" if ratio >= 1.3 else "no",
                f"{pair_read_note('qwen3-0.6b b256 ctx1100')}; {nano_runs_note()}; the decode kernel is what FP8 "
                "halves: nano's steps also run the same GEMMs and prompt passes as bf16's, and its prompt passes "
                f"read FP8 slower; {kernel_bandwidth_note('qwen3-0.6b b256 ctx1100')}{nano_host_note()}",
                "FP8 halves the bytes of one kernel, decode attention (at nano's shape "
                f"{pair_speedup('qwen3-0.6b b256 ctx1100')} bf16's); the GEMMs and sampling cost the same and the "
                f"prompt passes more{nano_h100_gist()}",
            )
        )
    kv_write = load("throughput_nano_kv_write_h200.json")
    if kv_write:
        by = {r["kv_write"]: r["output_tok_s"] for r in kv_write["runs"]}
        fused, unfused = by["fused"], by["two_launch"]
        rows.append(
            Row(
                "fused cast+store vs a two-launch KV write (cast, then scatter), `nano` fp8",
                f"{fmt(fused)} vs {fmt(unfused)} tok/s: {100 * (fused / unfused - 1):+.1f}%",
                "reported",
                "the KV write is a small part of a decode step at these shapes",
                "the KV write is a small part of a decode step at these shapes",
            )
        )
    if load("decode_attention_fp8_pairs_h200.json"):
        shape = "llama-8b b64 ctx4096"
        case = pair_rows(shape)
        d, hw, st = case["default"], case["hw"], case["staged"]
        rows.append(
            Row(
                "paged decode attention, fp8 >= 1.6x bf16 (bs 64 x 4k, Llama-3.1-8B heads)",
                f"{d['bf16_us']:.0f} vs {d['us']:.0f} us: {d['speedup_vs_bf16']:.2f}x (the byte read, `hw`: "
                f"{hw['us']:.0f} us, {hw['speedup_vs_bf16']:.2f}x; hw-staged {st['us']:.0f} us, "
                f"{st['speedup_vs_bf16']:.2f}x)",
                "yes" if d["speedup_vs_bf16"] >= 1.6 else "no",
                f"{pair_read_note(shape)}; the registers it needs, capped at 96 (`default_register_cap`, the same "
                f"bits): {case['pairs uncapped']['us']:.0f} us uncapped, {case['pairs r128']['us']:.0f} us at 128; "
                "before it, " + ncu_summary() + " (`decode_attention_fp8_registers.md`: the V gather)",
                "the FP8 kernel reads V in int16 pairs that ldmatrix transposes like a bf16 tile, its registers "
                "capped (the same bits)",
            )
        )
    worst, by_batch = fp8_vs_bf16_worst(), fp8_vs_bf16_worst(by_batch=True)
    if worst:
        ratio, where = worst
        opt_in = f'; with `decode_splits="by-batch"`: {by_batch[0]:.2f} ({by_batch[1]})' if by_batch else ""
        rows.append(
            Row(
                "FP8 KV never slower than bf16 at batch >= 8",
                f"worst fp8/bf16 throughput {ratio:.2f} ({where}){opt_in}",
                ("yes" if ratio >= 1.0 else "no")
                + (f"; with by-batch splits {'yes' if by_batch[0] >= 1.0 else 'no'}" if by_batch else ""),
                "close to 1 at Llama-3.2-1B's shape, where single sweep points move between sessions by more than "
                f"these margins (the history of `throughput_sweep_llama1b_h200.json` in git; {sweep_rounds_note()}); "
                "at head_dim 64 the "
                f"FP8 decode kernel is only {pair_speedup('llama-1b b64 ctx640')} bf16's at batch 64 "
                f"({pair_speedup('llama-1b b64 ctx640', 'hw')} with V gathered byte by byte; "
                f"`decode_attention_fp8_pairs_h200.json`){fixed_step_note()}, "
                "and the sweep's short runs (64 new tokens) are mostly prompt passes, which read FP8 slower: "
                f"{head64_fp8_note()}",
                f"at head_dim 64 the FP8 decode kernel is only {pair_speedup('llama-1b b64 ctx640')} bf16's and FP8 "
                "prompt passes are slower, so short runs sit near 1, and single sweep points move between sessions "
                f"by more than the margin{sweep_h100_gist()}",
            )
        )
    fixed = load("throughput_fixed_llama1b_h200.json")
    if fixed:
        step = runs_by_kv(fixed)["auto"]["decode_step_ms_direct"]
        rows.append(
            Row(
                "Llama-3.2-1B shape, batch 64: decode step <= 1.2 ms",
                f"{step:.2f} ms (bf16; prompt 512, 256 new)",
                "yes" if step <= 1.2 else "no",
                "GPU time, not the host, sets the step: "
                + decode_profile("profile_decode_llama1b_b64_h200.json")
                + batch64_floor_note(fixed, 1.2)
                + gemm_note(64),
                f"GPU time sets the step, not the host{batch64_floor_gist(fixed, 1.2)}",
            )
        )
    for name, shape, target in (
        ("throughput_latency_llama1b_h200.json", "Llama-3.2-1B", 1250),
        ("throughput_latency_llama8b_h200.json", "Llama-3.1-8B", 260),
    ):
        lat = load(name)
        if lat:
            run, fast = runs_by_kv(lat)["auto"], by_batch_runs(lat).get("auto")
            tps = run["decode_tok_s"]
            opt_in = f'; opt-in `decode_splits="by-batch"`: {fmt(fast["decode_tok_s"])} tok/s' if fast else ""
            rows.append(
                Row(
                    f"batch 1, {shape} shape: >= {target:,} tok/s",
                    f"{fmt(tps)} tok/s ({fmt(run['pct_roofline_measured_copy'])}% of the roofline){opt_in}",
                    "yes" if tps >= target else "no",
                    "at batch 1 every kernel is tiny: launch gaps and small-GEMV efficiency, not bytes"
                    + (f"; {decode_profile('profile_decode_llama1b_b1_h200.json')}" if "1B" in shape else "")
                    + (rope_note() + merge_note() if "1B" in shape else "")
                    + gemm_floor_note(lat, target)
                    + small_batch_decode_note()
                    + (gemm_note(1) if "1B" in shape else ""),
                    "every kernel is tiny, so launch gaps and small-GEMV efficiency set the step, not bytes"
                    + gemm_floor_gist(lat, target)
                    + "; batch-invariant attention splits cost more (opt-in by-batch splits above)",
                )
            )
    pre = load("throughput_prefill_qwen3_h200.json")
    if pre and pre.get("hf_prefill"):
        by_variant = {r.get("extend_variant", "default"): r for r in pre["runs"]}
        ours = {r["prompt"]: r["ttft_s"] for r in by_variant["default"]["prefill"]}
        hf = {r["prompt"]: r["hf_forward_s"] for r in pre["hf_prefill"]}
        n = max(ours)
        plain = {r["prompt"]: r["ttft_s"] for r in by_variant["plain"]["prefill"]} if "plain" in by_variant else {}
        rows.append(
            Row(
                f"one {n // 1024}k-token prompt (Qwen3-0.6B shape): TTFT <= one HF SDPA forward",
                f"{ours[n]:.3f} s vs {hf[n]:.3f} s" + (f" (the launch before: {plain[n]:.3f} s)" if n in plain else ""),
                "yes" if ours[n] <= hf[n] else f"no ({ours[n] / hf[n]:.2f}x)",
                extend_why(),
                "the extend kernel's launch (tile rows, masks, a register cap) is picked by the prompt's shape: the "
                "same bits, faster at long prompts",
            )
        )
    prefix = load("throughput_prefix_llama1b_h200.json")
    if prefix:
        r = prefix["runs"][0]
        rows.append(
            Row(
                "prefix caching, 256 requests sharing a 2,000-token prompt: >= 3x lower mean TTFT, >= 2x throughput",
                f"{r['ttft_reduction']:.1f}x lower TTFT, {r['throughput_gain']:.1f}x throughput (Llama-3.2-1B shape)",
                "yes" if r["ttft_target_met"] and r["throughput_target_met"] else "no",
                "the shared prompt is computed once; the rest reuse its blocks",
                "the shared prompt is computed once; the rest reuse its blocks",
            )
        )
    rows += serving_rows()
    hf_ratios = [
        (r.get("speedup_vs_hf"), n)
        for n in ("throughput_latency_llama1b_h200.json", "throughput_latency_llama8b_h200.json")
        if (r := load(n)) and r.get("speedup_vs_hf")
    ]
    if hf_ratios:
        low = min(hf_ratios)
        hf = load(low[1])["hf"]
        rows.append(
            Row(
                "every workload >= 10x HF transformers on the same work",
                f"lowest measured: {low[0]:.0f}x (`{low[1]}`: HF `generate` timed once, {hf['gen']} new tokens); "
                f"measured on {len(hf_ratios)} workload{'s' if len(hf_ratios) > 1 else ''} only",
                ("yes" if low[0] >= 10 else "no") + " where measured",
                "HF `generate` is timed on the latency workloads",
                "HF `generate` is timed on the batch-1 latency workloads that ran with --hf (one timed run, its own "
                "--hf-gen new tokens, tok/s compared); the batched workloads' HF runs are not in the result files",
            )
        )
    return rows


def fixed_step_note() -> str:
    """The Llama-3.2-1B batch-64 run's decode steps, fp8 against bf16: the step and the whole run can disagree."""
    fixed = load("throughput_fixed_llama1b_h200.json")
    if not fixed:
        return ""
    kv = runs_by_kv(fixed)
    f, b = kv["fp8"], kv["auto"]
    if (f["decode_step_ms_direct"] < b["decode_step_ms_direct"]) == (f["output_tok_s"] > b["output_tok_s"]):
        return ""
    return (
        f" (the batch-64 run: fp8's decode step {f['decode_step_ms_direct']:.2f} ms against bf16's "
        f"{b['decode_step_ms_direct']:.2f}, its whole run {f['output_tok_s'] / b['output_tok_s']:.2f}x: the runs' "
        "totals vary by more than the difference)"
    )


def met_with_servers(runs: list[tuple[int, dict]], ok, what: str) -> str:
    """Which numbers of API servers met a target ("no" when none did)."""
    met = [str(n) for n, ph in runs if ok(ph)]
    plural = "s" if met != ["1"] else ""
    return f"{what}: yes with {', '.join(met)} API server{plural}" if met else f"{what}: no"


def serving_rows() -> list[Row]:
    """The server's targets (issue: the serving path), from serve.py's files and the demo A/B."""
    rows = []
    files = {n: load("serve_h200.json" if n == 1 else f"serve_api{n}_h200.json") for n in (1, 2, 4, 8)}
    runs = [(n, data["phases"]) for n, data in files.items() if data]
    if runs and runs[0][0] == 1:
        measured = "; ".join(
            f"{n} API server{'s' if n > 1 else ''}: streaming {ph['stream']['vs_offline']:.2f}x, plain "
            f"{ph['plain']['vs_offline']:.2f}x (offline {fmt(ph['offline']['output_tok_s'])} tok/s"
            + (f"; medians of {len(ph['stream']['repeats_tok_s'])} runs" if "repeats_tok_s" in ph["stream"] else "")
            + ")"
            for n, ph in runs
        )
        rows.append(
            Row(
                "server, 256 requests at once (512 in, 256 out): streaming >= 0.9x offline, plain >= 0.95x",
                measured,
                met_with_servers(runs, lambda ph: ph["stream"]["vs_offline"] >= 0.9, "streaming")
                + "; "
                + met_with_servers(runs, lambda ph: ph["plain"]["vs_offline"] >= 0.95, "plain"),
                "each online phase sends prompts of its own (an earlier phase's would be in the prefix cache). "
                + first_burst_note()
                + serve_ramps()
                + serve_ab_note()
                + "Plain requests lose their time at both ends: the API process admits the 256 over about 0.2 s (its "
                "requests one at a time, `adds_ms` in the trace) and writes 256 whole responses at the end; several "
                "API servers share both (`--api-servers N`, `miniserve/server/launcher.py`). Each run against the "
                "offline engine in the same process run; the plain ratio varies most between runs of the lent H200 "
                f"(one API server: {plain_in_trace()} in the traced run)",
                "each step's events are written from the callback that applied it, straight to the streams' "
                "sockets, and several API server processes can share the engine",
            )
        )
        itl = "ITL p50 with " + "; ".join(
            f"{n} API server{'s' if n > 1 else ''}: {p50_of_runs(ph['stream'], 'itl')} = {itl_ratio(ph):.2f}x (step "
            f"{itl_step(ph):.1f} ms)"
            for n, ph in runs
        )
        rows.append(
            Row(
                "server: inter-token latency p50 within 1.2x of the offline decode step",
                itl,
                met_with_servers(runs, lambda ph: itl_ratio(ph) <= 1.2, "ITL"),
                "a stream whose events the API process could not write in time gets its new tokens joined into one "
                "event (fewer, larger events), which keeps throughput and costs inter-token latency; each step's "
                "events are written from the callback that applied the step, each stream's straight to its socket "
                "(`server/body_writer.py`), and a plain text piece is encoded into the bytes of the rest of its event "
                f"(`server/responses.py:TextChunks`); {serve_trace_saturated()}; {decode_step_spread()}",
                "a stream the API process cannot write in time gets its new tokens joined into fewer, larger events",
            )
        )
    rate = load("serve_rate4_h200.json")
    if rate:
        s, offline = rate["phases"]["stream"], rate["phases"]["offline"]
        idle = offline.get("single_request_prefill_after_idle_ms")
        rows.append(
            Row(
                "server below saturation (4 requests/s): TTFT p50 <= 2x a single-request prefill",
                f"{p50_of_runs(s, 'ttft')} = {s['ttft_p50_vs_prefill']:.2f}x "
                f"(prefill {offline['single_request_prefill_ms']:.2f} ms"
                + (f"; {idle:.2f} ms after 0.25 s idle" if idle else "")
                + ")",
                "yes" if s["ttft_p50_vs_prefill"] <= 2 else "no",
                "a new prompt runs as its own captured prompt pass beside the running decodes; "
                + launch_hold_note()
                + lone_note(rate["phases"])
                + idle_note(s, offline)
                + serve_trace_rate(),
                "a new prompt runs as its own captured pass beside the running decodes, and below saturation the "
                "next decode step is launched only as the one in flight ends",
            )
        )
    ab = load("spec_decode_ab_h200.json")
    if ab:
        r = ab["new_vs_old"]
        rows.append(
            Row(
                "the demo model's batch-1 path unchanged (`spec_decode.py`, side by side with the tree before)",
                f"plain {r['plain']:.3f}x, speculative k=4 {r['k4']:.3f}x of {ab['old_commit']}",
                "yes" if min(r.values()) >= 0.97 else "no",
                f"medians of {len(ab['runs']) // 2} alternated runs of each tree",
                f"medians of {len(ab['runs']) // 2} alternated runs of each tree",
            )
        )
    row = constrained_row()
    if row:
        rows.append(row)
    return rows


CONSTRAINED_RUNS = {  # (shape, vocabulary) -> structured_outputs.py's result
    ("Llama-3.1-8B", "cl100k-like"): "structured_outputs_llama8b_cl100k_h200.json",
    ("Llama-3.1-8B", "JSON-heavy"): "structured_outputs_llama8b_h200.json",
    ("Llama-3.2-1B", "cl100k-like"): "structured_outputs_cl100k_h200.json",
    ("Llama-3.2-1B", "JSON-heavy"): "structured_outputs_h200.json",
}


def constrained_row() -> Row | None:
    """Constrained decoding at batch 32 on each shape and vocabulary: (strings unbounded, a bounded name) ratios."""
    runs = {key: load(name) for key, name in CONSTRAINED_RUNS.items()}
    runs = {key: so for key, so in runs.items() if so}
    if not runs:
        return None
    measured = "; ".join(
        f"{shape} shape, {vocab} vocabulary: {so['ratios']['open']:.2f}x / {so['ratios']['bounded']:.2f}x"
        for (shape, vocab), so in runs.items()
    )
    groups: dict[str, list[str]] = {"yes": [], "unbounded strings only": [], "no": []}
    for (shape, vocab), so in runs.items():
        r = so["ratios"]
        group = "yes" if min(r["open"], r["bounded"]) >= 0.9 else "unbounded strings only" if r["open"] >= 0.9 else "no"
        groups[group].append(f"{shape} {vocab}")
    verdict = "; ".join(
        ([] if groups["yes"] else ["no"]) + [f"{k}: {', '.join(names)}" for k, names in groups.items() if names]
    )
    notes = [vocabulary_note(runs)]
    small = runs.get(("Llama-3.2-1B", "cl100k-like"))
    if small:
        notes.append("on the Llama-3.2-1B shape (cl100k-like) " + constrained_note(small))
    notes.append(other_host_note(small))
    notes.append(masked_sampling_note())
    notes.append(swap_note())
    notes.append(chain_note())
    notes.append(grammar_fill_note())
    return Row(
        "JSON-schema constrained decoding at batch 32: >= 0.9x unconstrained throughput (strings unbounded / a "
        "24-character name)",
        measured,
        verdict,
        "; ".join(n for n in notes if n),
        "xgrammar fills a step's masks on the host beside the GPU's forward pass: the Llama-3.1-8B shape's step "
        "leaves it the time, the Llama-3.2-1B shape's is shorter than a fill of bounded strings or of a vocabulary "
        "rich in quotes and newlines" + chain_why(),
    )


def unconstrained_step_ms(so: dict) -> float:
    free = so["unconstrained"]
    return 1e3 * free["seconds"] / (free["generated_tokens"] / so["batch"])


def vocabulary_note(runs: dict) -> str:
    """What the benchmark vocabularies are (vocab_shares.json), and each shape's unconstrained step."""
    shares = load("vocab_shares.json")
    if not shares:
        return ""
    v = shares["vocabularies"]

    def pct(row: dict) -> str:
        return f"{100 * row['quote']:.2f}% / {100 * row['newline']:.2f}% / {100 * row['backslash']:.2f}%"

    return (
        "what a constrained step costs on the host depends on the vocabulary: inside a JSON string xgrammar checks "
        "one by one the tokens that hold a quote, a newline or a backslash. The JSON-heavy synthetic vocabulary "
        "(every result before `vocab_shares.json`) has about 7% with a quote and 7% with a newline; real ones have "
        f"far fewer (quote / newline / backslash, `vocab_shares.json`): cl100k_base (the base of Llama 3's) "
        f"{pct(v['cl100k_base'])}, GPT-2 {pct(v['gpt2'])}; the cl100k-like vocabulary is drawn with cl100k_base's "
        "shares. An unconstrained step takes "
        + ", ".join(
            f"{unconstrained_step_ms(so):.2f} ms on the {shape} shape"
            for (shape, vocab), so in runs.items()
            if vocab == "cl100k-like"
        )
        + ": the larger model's step leaves the host time to fill the masks beside it, the smaller one's does not"
    )


def other_host_note(h200: dict | None) -> str:
    """The same 1B runs on another lent machine (an H100 box): what a slower host does to the ratios."""
    other, heavy = load("structured_outputs_cl100k_h100.json"), load("structured_outputs_h100.json")
    if not other or not h200:
        return ""
    split, base = other["constrained_open"]["host_ms_per_step"], h200["constrained_open"]["host_ms_per_step"]
    r = other["ratios"]
    threads = sorted({int(k.removeprefix("open_threads")) for k in r if k.startswith("open_threads")})
    return (
        f"the same run on an H100 machine, another host (`structured_outputs_cl100k_h100.json`, "
        f"{other['provenance']['commit']}): {r['open']:.2f}x / {r['bounded']:.2f}x"
        + "".join(
            f" (on {n} mask thread{'s' * (n != 1)}: {r[f'open_threads{n}']:.2f}x / {r[f'bounded_threads{n}']:.2f}x)"
            for n in threads
        )
        + (
            f", JSON-heavy {heavy['ratios']['open']:.2f}x / {heavy['ratios']['bounded']:.2f}x "
            f"(`structured_outputs_h100.json`, {heavy['provenance']['commit']})"
            if heavy
            else ""
        )
        + f"; its engine thread spends {split['engine_step']:.2f} ms a step against {unconstrained_step_ms(other):.2f} "
        f"ms unconstrained, each phase {min(split[k] / base[k] for k in HOST_PHASES):.1f}-"
        f"{max(split[k] / base[k] for k in HOST_PHASES):.1f}x the H200 host's"
    )


def masked_sampling_note() -> str:
    """The grammar masks read by the sampling kernel: the sampling alone, and end to end beside the tree before."""
    ab, kernel = load("structured_outputs_masked_ab_h100.json"), load("sampling_kernel_h100.json")
    if not ab or not kernel:
        return ""
    med, pairs = ab["median_ratios"], ab["pairs"]
    first = next(iter(pairs.values()))
    timing = {(r["batch"], r["temperature"]): r for r in kernel["masked_timing"]}
    greedy, drawn = timing[(32, 0.0)], timing[(32, 1.0)]
    masked = kernel["masked"]
    return (
        "since cb00f9f the sampling kernel reads a grammar's masks (a word per 32 logits) for rows without a seed or "
        f"filter: a constrained batch of 32 is sampled in {drawn['kernel_us']:.0f} us against the torch path's "
        f"{drawn['torch_us']:.0f} us, greedy {greedy['kernel_us']:.0f} against {greedy['torch_us']:.0f} us (host "
        f"launches included; {drawn['kernel_gpu_us']:.0f} / {drawn['torch_gpu_us']:.0f} us of GPU time; "
        f"`sampling_kernel_h100.json`: greedy rows the torch path's bits, "
        f"{sum(r['greedy_mismatches'] + r['race_mismatches'] + r['banned_draws'] for r in masked)} disagreements or "
        f"banned draws); end to end, unseeded runs side by side with {first['old']['commit']} ({len(pairs)} "
        "alternated rounds on an H100 machine, `structured_outputs_masked_ab_h100.json`): medians "
        f"{med['old']['open_unseeded']:.3f} -> {med['new']['open_unseeded']:.3f} (unbounded), "
        f"{med['old']['bounded_unseeded']:.3f} -> {med['new']['bounded_unseeded']:.3f} (bounded): within the runs' "
        "spread, the host's mask fill still setting the pace"
    )


HOST_PHASES = ("forward_launch", "fill", "sample_launch", "engine_step")


def swap_note() -> str:
    """The fill on the engine's thread with the noise on a helper, side by side with the reverse."""
    ab = load("structured_outputs_ab_h200.json")
    if not ab:
        return ""
    med, pairs = ab["median_ratios"], ab["pairs"]
    first = next(iter(pairs.values()))
    return (
        f"side by side with {first['old']['commit']} ({len(pairs)} alternated rounds, "
        "`structured_outputs_ab_h200.json`, 1B cl100k-like), the engine's thread filling the masks while a helper "
        "draws the noise, instead of the reverse (which had this thread wait until the helper held the GIL): "
        f"medians {med['old']['open']:.3f} -> {med['new']['open']:.3f} (unbounded), "
        f"{med['old']['bounded']:.3f} -> {med['new']['bounded']:.3f} (bounded, within the runs' spread)"
    )


def chain_note() -> str:
    """Length-bounded strings written as chains of rules: the fill alone on the CPU (the same random paths with and
    without them), and end to end side by side with the tree before (an H100 machine)."""
    note = (
        "a length-bounded string is now written as a chain of grammar rules, one per character count "
        "(`engine/structured_output.py:_chained_strings`; the same masks), whose token masks xgrammar precomputes, "
        "where it checked a repetition's tokens one by one every step"
    )
    fills = {}
    for name, vocab in (("cl100k-like", "cl100k"), ("JSON-heavy", "heavy")):
        before, after = (load(f"grammar_fill_{vocab}_{how}_cpu.json") for how in ("repetitions", "chains"))
        if before and after and before.get("paths") == after.get("paths") is not None:  # the same states
            fills[name] = (before, after)
    if fills:
        host = next(iter(fills.values()))[1]
        note += (
            f": the bounded fill alone, {host['provenance']['device']} ({host['cpus']['sched_getaffinity']} cores, "
            "`grammar_fill_*_{repetitions,chains}_cpu.json`, the same random paths), rows one after another / the "
            "slowest row: "
            + "; ".join(
                f"{name} {b['rows']['median_ms']:.2f} -> {a['rows']['median_ms']:.2f} / "
                f"{b['slowest row']['median_ms']:.2f} -> {a['slowest row']['median_ms']:.2f} ms"
                for name, files in fills.items()
                for b, a in [[f["schemas"]["bounded"] for f in files]]
            )
        )
    runs = chain_runs()
    if not runs:
        return note + "; not yet measured end to end on a GPU (the ratios above are from before it)"
    pairs = next(iter(runs.values()))[0]["pairs"]
    old = next(iter(pairs.values()))["old"]["commit"]
    return note + (
        f"; end to end, side by side with {old} ({len(pairs)} alternated rounds on an H100 machine, "
        "Llama-3.2-1B shape, medians unbounded / bounded): "
        + "; ".join(
            f"{vocab} {m['old']['open']:.3f} -> {m['new']['open']:.3f} / {m['old']['bounded']:.3f} -> "
            f"{m['new']['bounded']:.3f} (`{name}`)"
            for vocab, (ab, name) in runs.items()
            for m in [ab["median_ratios"]]
        )
        + recheck_note()
        + "; the H200 rows above are from before the chains"
    )


def recheck_spread() -> tuple[dict, list[float]] | None:
    """The chained tree beside a later one on another H100 machine: (structured_outputs_ab.py's result, every
    round's constrained / unconstrained ratio, both schemas, both trees)."""
    ab = load("structured_outputs_chain_recheck_ab_h100.json")
    if not ab:
        return None
    return ab, [r for pair in ab["pairs"].values() for side in pair.values() for r in side["ratios"].values()]


def recheck_note() -> str:
    spread = recheck_spread()
    if not spread:
        return ""
    ab, ratios = spread
    first = next(iter(ab["pairs"].values()))
    m = ab["median_ratios"]
    within = all(abs(m["new"][k] - m["old"][k]) < max(ratios) - min(ratios) for k in m["new"])
    spread_said = ", within the runs' spread" if within else ""
    return (
        f"; on another H100 machine the chained tree ({first['old']['commit']}) beside {first['new']['commit']} "
        f"({len(ab['pairs'])} alternated rounds, cl100k-like, `structured_outputs_chain_recheck_ab_h100.json`): "
        f"medians {m['old']['open']:.3f} -> {m['new']['open']:.3f} / {m['old']['bounded']:.3f} -> "
        f"{m['new']['bounded']:.3f}{spread_said}; each run's ratio anywhere in "
        f"{min(ratios):.2f}-{max(ratios):.2f}: at the 1B shape's step the host's mask fill and reads leave little "
        "margin, so how fast and how quiet the host's CPU is moves the ratio"
    )


def chain_runs() -> dict[str, tuple[dict, str]]:
    """The chained-strings side-by-side runs by vocabulary: (structured_outputs_ab.py's result, its file)."""
    names = {
        "cl100k-like": "structured_outputs_chain_ab_h100.json",
        "JSON-heavy": "structured_outputs_chain_heavy_ab_h100.json",
    }
    runs = {vocab: (load(name), name) for vocab, name in names.items()}
    return {vocab: run for vocab, run in runs.items() if run[0]}


def chain_why() -> str:
    """Row 15's short why: what the chains did to the bounded rows, side by side on an H100 machine."""
    runs = chain_runs()
    if not runs:
        return ""
    each = ", ".join(
        f"{vocab} bounded {m['old']['bounded']:.2f}x -> {m['new']['bounded']:.2f}x"
        for vocab, (ab, _) in runs.items()
        for m in [ab["median_ratios"]]
    )
    return (
        f"; since then length-bounded strings are chains of grammar rules, whose masks xgrammar precomputes: {each} "
        "on the Llama-3.2-1B shape, side by side on an H100 machine (not yet on the H200)"
        + (
            f"; on another H100 machine single runs of the same code spread over "
            f"{min(spread[1]):.2f}-{max(spread[1]):.2f}x"
            if (spread := recheck_spread())
            else ""
        )
    )


def mask_ms(run: dict) -> float:
    return 1e3 * run["mask_host_seconds_per_run"] / max(run["mask_calls_per_run"], 1)


def constrained_note(so: dict) -> str:
    """Where a constrained step's time goes, from structured_outputs.py's runs (default threads, and one thread)."""
    free = so["unconstrained"]
    steps = free["generated_tokens"] / so["batch"]
    step_ms = {k: 1e3 * r["seconds"] / steps for k, r in so.items() if isinstance(r, dict) and "seconds" in r}
    note = (
        f"a step takes {step_ms['unconstrained']:.2f} ms unconstrained, {step_ms['constrained_open']:.2f} / "
        f"{step_ms['constrained_bounded']:.2f} ms constrained, of which xgrammar's mask fill is "
        f"{mask_ms(so['constrained_open']):.2f} / {mask_ms(so['constrained_bounded']):.2f} ms on the host"
    )
    single = so.get("constrained_open_threads1")
    if single:
        note += (
            f" ({mask_ms(single):.2f} / {mask_ms(so['constrained_bounded_threads1']):.2f} ms on one thread: "
            f"{so['ratios']['open_threads1']:.2f}x / {so['ratios']['bounded_threads1']:.2f}x)"
        )
    split = so["constrained_open"].get("host_ms_per_step")
    if split:
        note += (
            ". The host sets the pace: timed phase by phase (`--host-split`, strings unbounded), the engine's thread "
            f"spends {split['engine_step']:.2f} ms a step: launching the forward pass {split['forward_launch']:.2f} "
            f"ms, reading the step before and feeding each token to its grammar {split['read_step']:.2f} ms, "
            f"{split['next_batch']:.2f} ms on the next sampling batch (filling the masks, {split['fill']:.2f} ms, "
            f"while a helper thread draws the seeded rows' noise, {split['noise_draws']:.2f} ms{text_note(split)}), "
            f"and launching the sampling {split['sample_launch']:.2f} ms; the forward pass runs meanwhile"
        )
    return note


def text_note(split: dict) -> str:
    """The helper's share of a constrained step read (runs since the text went beside the fill: d300835)."""
    if "text_and_stops" not in split:
        return ""
    return f", and detokenizes the step read, {split['text_and_stops']:.2f} ms"


def grammar_fill_note() -> str:
    """Why the fill costs what it does, from grammar_fill.py on the benchmark's host (the same states, every way)."""
    fills = {name: load(f"grammar_fill{s}_h200.json") for name, s in (("JSON-heavy", ""), ("cl100k-like", "_cl100k"))}
    fills["GPT-2-like"] = load("grammar_fill_gpt2_h200.json")
    fills = {name: f for name, f in fills.items() if f}
    if not fills:
        return "not measured alone"

    def alone(f: dict, schema: str) -> str:
        rows = f["schemas"][schema]
        best = min((r["median_ms"], k) for k, r in rows.items() if k.startswith("batch "))
        slowest = f" (its slowest row {rows['slowest row']['median_ms']:.2f})" if "slowest row" in rows else ""
        return (
            f"{rows['rows']['median_ms']:.2f} ms on one thread{slowest}, {best[0]:.2f} on "
            f"{best[1].removeprefix('batch ')}"
        )

    batch = next(iter(fills.values()))["batch"]
    each = "; ".join(f"{name} {alone(f, 'open')} / {alone(f, 'bounded')}" for name, f in fills.items())
    return f"alone, before the chains, {batch} rows fill (unbounded / bounded, `grammar_fill*_h200.json`): {each}"


def serve_trace(run: str) -> dict | None:
    """serve_trace.py's analysis of one traced run ("saturated" or "rate4") of serve_trace_h200.json."""
    trace = load("serve_trace_h200.json")
    return trace[run]["trace"]["real/stream"] if trace else None


def traced_ratios() -> str:
    """The traced saturated run's own throughput ratios (one run each: they vary more than the medians above)."""
    phases = load("serve_trace_h200.json")["saturated"]["phases"]
    return f"streaming {phases['stream']['vs_offline']:.2f}x, plain {phases['plain']['vs_offline']:.2f}x"


def serve_trace_commit(run: str) -> str:
    """The commit a traced run of serve_trace_h200.json measured."""
    return load("serve_trace_h200.json")[run]["versions"]["commit"]


def lone_note(phases: dict) -> str:
    """TTFT of a request alone on the server, the same run: what HTTP and the processes add to the prefill."""
    lone = phases.get("lone")
    if not lone:
        return ""
    return (
        f"a request alone on the server (new prompts, 0.25 s apart) gets its first token in "
        f"{lone['ttft_ms']['p50']:.1f} ms (p50), so at 4 requests/s TTFT p50 is "
        f"{phases['stream']['ttft_p50_vs_lone']:.2f}x that; "
    )


def idle_note(stream: dict, offline: dict) -> str:
    """How often a request below saturation finds the engine idle, and what a prefill costs after an idle gap."""
    idle = offline.get("single_request_prefill_after_idle_ms")
    if not idle:
        return ""
    in_flight = stream["requests_s"] * stream["e2e_ms"]["mean"] / 1000
    return (
        f"{in_flight:.1f} requests are in flight on average at this rate (Poisson arrivals: about "
        f"{100 * math.exp(-in_flight):.0f}% find the engine idle, the rest wait for the decode step in flight); a "
        f"prefill after 0.25 s of idle takes {idle:.2f} ms against {offline['single_request_prefill_ms']:.2f} back "
        f"to back (not profiled), and against that one TTFT p50 is {median_p50(stream, 'ttft') / idle:.1f}x. The "
        "reference prompts are new ones (the workload's own would hit the prefix cache); "
    )


def first_burst_note() -> str:
    """What a server's first burst paid before and after the per-step arguments stopped being specialized."""
    fs = load("first_steps_h200.json")
    if not fs:
        return ""

    def summary(run: dict) -> str:
        first, again = run["rounds"][0], run["rounds"][1]
        compiled = sum(1 for step in first["slow_steps"] if step["compiled"])
        return (
            f"{first['seconds_in_steps']:.2f} s of steps against {again['seconds_in_steps']:.2f} s for the same "
            f"burst again, {compiled} of its steps compiling a kernel"
        )

    return (
        "The first burst after start-up used to stall the engine: Triton compiled a new variant of the cache write "
        "and of the extend kernel for each new class (1, multiple of 16, other) of a token count or block-table "
        "width; those arguments are no longer specialized (`tests/test_compile_variants.py`). Offline, 256 prompts "
        f"(`first_steps_h200.json`): {summary(fs['old'])} at {fs['old']['commit']}; {summary(fs['new'])} now. "
    )


def serve_ab_note() -> str:
    """What this session's serving changes did: each pair of serve_ab_h200.json, served back to back on one GPU."""
    ab = load("serve_ab_h200.json")
    if not ab:
        return ""

    def pair(name: str, p: dict) -> str:
        old, new = p["old"], p["new"]
        what = f"{old['commit']} -> {new['commit']}" if old["commit"] != new["commit"] else f"at {new['commit']}"
        return (
            f"{name} ({what}): streaming {old['stream']['vs_offline']:.2f}x -> "
            f"{new['stream']['vs_offline']:.2f}x, plain {old['plain']['vs_offline']:.2f}x -> "
            f"{new['plain']['vs_offline']:.2f}x, the engine's step while streaming {old['stream']['ms_per_step']:.1f} "
            f"-> {new['stream']['ms_per_step']:.1f} ms, ITL p50 {old['stream']['itl_p50_ms']:.1f} -> "
            f"{new['stream']['itl_p50_ms']:.1f} ms"
        )

    pairs = "; ".join(pair(name, p) for name, p in ab["pairs"].items())
    return f"Served back to back in one GPU session each (`serve_ab_h200.json`): {pairs}. "


def plain_in_trace() -> str:
    t = load("serve_trace_h200.json")
    plain = t["saturated"]["phases"].get("plain") if t else None
    return f"{plain['vs_offline']:.2f}x" if plain else "not traced"


def serve_ramps() -> str:
    """The traced saturated run's engine timeline per phase: when it had every request, its steps after that."""
    t = load("serve_trace_h200.json")
    ramps = t["saturated"]["trace"] if t else {}
    if "ramp/stream" not in ramps or "ramp/offline" not in ramps:
        return ""
    s, p, o = ramps["ramp/stream"], ramps.get("ramp/plain"), ramps["ramp/offline"]
    plain = f", plain {p['steps_after_last_add']} at {p['engine_step_ms_after_last_add']:.2f} ms" if p else ""
    return (
        f"Traced (`serve_trace_h200.json`), the engine had the last of the 256 streamed requests "
        f"{s['adds_ms'].split('last ')[1]} ms into the run; its steps after that: streaming "
        f"{s['steps_after_last_add']} at {s['engine_step_ms_after_last_add']:.2f} ms each (sending each step's message "
        f"{s['send_ms_after_last_add']:.2f} ms){plain}, offline {o['steps_after_last_add']} at "
        f"{o['step_ms_after_last_add']:.2f} ms. "
    )


def itl_step(phases: dict) -> float:
    """The decode step ITL is divided by: the offline run's full-batch decode step (serve.py's decode_step_time)."""
    return phases["offline"]["decode_step_ms"]


def itl_ratio(phases: dict) -> float:
    return median_p50(phases["stream"], "itl") / itl_step(phases)


def p50_of_runs(stream: dict, key: str) -> str:
    """A streamed phase's ITL or TTFT p50 (`key` "itl", "ttft") as the README shows it: the median, and each run's."""
    runs = stream.get(f"repeats_{key}_p50_ms") or []
    each = f" (median of runs: {', '.join(f'{x:.1f}' for x in runs)})" if len(runs) > 1 else ""
    return f"{median_p50(stream, key):.1f} ms{each}"


def decode_step_spread() -> str:
    """How much the offline decode step that ITL is divided by moved between the serving runs' offline phases."""
    files = ("serve_h200.json", "serve_api4_h200.json", "serve_trace_h200.json")
    runs = [load(f) for f in files]
    steps = [r["phases"]["offline"]["decode_step_ms"] for r in runs[:2] if r]
    if runs[2]:
        steps.append(runs[2]["saturated"]["phases"]["offline"]["decode_step_ms"])
    if len(steps) < 2:
        return ""
    return (
        f"the offline decode step it is divided by moved between runs of the lent H200: {min(steps):.2f} to "
        f"{max(steps):.2f} ms in the offline phases of {', '.join(f'`{f}`' for f in files)}"
    )


def serve_trace_saturated() -> str:
    """The traced saturated run: how many of the 256 streams' events the API process writes per engine step."""
    t = serve_trace("saturated")
    return (
        "not traced"
        if t is None
        else (
            f"traced ({serve_trace_commit('saturated')}, `serve_trace_h200.json`, one run of each phase: "
            f"{traced_ratios()}): the engine sent a step every {p50(t['engine_step_gap_ms'])} ms "
            f"(p50) and the API process wrote {t['writes_per_step']:.0f} events per step, reading the engine's "
            f"messages {p50(t['steps_per_handover'])} steps at a time (p50; p90 {t['steps_per_handover'].split()[3]}) "
            f"and taking, detokenizing and writing them in {p50(t['routing_ms_per_handover'])} ms; with 4 API "
            "servers each does a quarter"
        )
    )


def serve_trace_rate() -> str:
    """The traced run below saturation: each request's time to first token, stage by stage (p50)."""
    t = serve_trace("rate4")
    return (
        "not traced"
        if t is None
        else (
            f"traced at 4 requests/s ({serve_trace_commit('rate4')}, `serve_trace_h200.json`, p50): admission (HTTP, "
            f"parsing, checks) {p50(t['ttft_admission_ms'])} ms, the hop to the engine process "
            f"{p50(t['ttft_to_engine_ms'])} ms, the engine {p50(t['ttft_engine_ms'])} ms, the way back to the client "
            f"{p50(t['ttft_to_client_ms'])} ms; " + rate4_wait()
        )
    )


def launch_hold_note() -> str:
    """The launch hold side by side with the tree before it (serve_rate4_ab_h200.json): each round's TTFT and TPOT."""
    ab = load("serve_rate4_ab_h200.json")
    if not ab:
        return ""
    rounds = list(ab["pairs"].values())

    def change(key: str) -> str:
        return ", ".join(f"{p['old']['stream'][key]:.3f} -> {p['new']['stream'][key]:.3f}" for p in rounds)

    return (
        "the running batch's next decode step is launched only when the step in flight is about to end, the "
        "engine process waiting for requests until then (`engine/launch_hold.py`), so a prompt that arrives "
        "meanwhile runs right after that step, not also after one queued behind it, and the decodes beside it "
        "are launched before its first token is read; side by side with "
        f"{rounds[0]['old']['commit']} ({len(rounds)} alternated rounds of 3 runs, `serve_rate4_ab_h200.json`): "
        f"TTFT p50 {change('ttft_p50_ms')} ms, the running streams' TPOT p50 {change('tpot_p50_ms')} ms; "
    )


def rate4_wait() -> str:
    """The traced 4 req/s run: the hop to the engine plus the engine's part of TTFT beyond a prefill (p50s), in ms
    and in decode steps of the run's own streams (their TPOT p50)."""
    run = load("serve_trace_h200.json")["rate4"]
    t, phases = run["trace"]["real/stream"], run["phases"]
    wait = float(p50(t["ttft_to_engine_ms"])) + float(p50(t["ttft_engine_ms"]))
    wait -= phases["offline"]["single_request_prefill_ms"]
    return (
        f"the hop and the engine together took {wait:.1f} ms more than a prefill, "
        f"{wait / phases['stream']['tpot_ms']['p50']:.1f} decode steps of this batch"
    )


def p50(summary: str) -> str:
    """The p50 out of serve_trace.py's "p50 X  p90 Y  p99 Z"."""
    return summary.split()[1]


def sampler_note() -> str:
    """The fused sampling kernel: its GPU time against torch's sampler at nano's shape, and the runs before/after."""
    ab, kernel = load("sampler_ab_h200.json"), load("sampling_kernel_h200.json")
    if not ab or not kernel:
        return ""
    t = next(r for r in kernel["timing"] if r["batch"] == 256 and r["temperature"] > 0)
    side = {w: x["rows"][0] for w, x in ab["workloads"].items()}
    nano, lat = side["nano"], side["latency"]
    return (
        f"a step's temperature sampling is one Gumbel-max race over the logits (`kernels/sampling.py`): at batch "
        f"{t['batch']} x {t['vocab']:,} it takes {t['kernel_gpu_us']:.0f} us of GPU time against torch's "
        f"{t['torch_gpu_us']:.0f} us (`sampling_kernel_h200.json`); side by side with {ab['old_commit']} "
        f"(`sampler_ab_h200.json`): nano {fmt(nano['old_tok_s'])} -> {fmt(nano['new_tok_s'])} tok/s "
        f"({nano['new_vs_old']:.3f}x), and with the greedy argmax in two small launches batch-1 latency "
        f"{lat['new_vs_old']:.3f}x; "
    )


def rope_note() -> str:
    """RoPE moved into the KV write (one launch fewer a layer): the tree before and this one, side by side."""
    ab = load("engine_ab_h200.json")
    if not ab or "latency" not in ab["workloads"]:
        return ""
    rows = {w: {r["config"]: r for r in x["rows"]} for w, x in ab["workloads"].items()}
    lat, fixed = rows["latency"], rows.get("fixed", {})
    nano = [rows[w] for w in sorted(rows) if w.startswith("nano")]
    kv = {"auto": "bf16"}  # the runs' kv_cache_dtype label
    batch64 = ", ".join(f"{kv.get(c, c)} {r['new_vs_old']:.2f}x" for c, r in fixed.items())
    nano_ratios = ", ".join(
        f"{kv.get(c, c)} " + " / ".join(f"{n[c]['new_vs_old']:.2f}x" for n in nano) for c in nano[0]
    )
    return (
        "; RoPE rides in the KV write (`reshape_and_cache(rope=...)`: one launch fewer a layer, the same bits), side "
        f"by side with {ab['old_commit']} (`engine_ab_h200.json`): batch 1 {fmt(lat['auto']['old_tok_s'])} -> "
        f"{fmt(lat['auto']['new_tok_s'])} tok/s (by-batch {fmt(lat['auto by-batch']['old_tok_s'])} -> "
        f"{fmt(lat['auto by-batch']['new_tok_s'])}), batch 64 {batch64}, nano {nano_ratios} "
        f"({len(nano)} alternated rounds)"
    )


def merge_note() -> str:
    """The split merge moved into the decode kernel's last program: tried, same bits, not kept."""
    ab = load("decode_ab_h200.json")
    if not ab:
        return ""
    rows = {r["case"]: r for r in ab["rows"]}
    b1, b64 = rows["llama-1b b1 ctx640 bf16 by-batch"], rows["llama-1b b64 ctx640 bf16 by-length"]
    return (
        "; merging a sequence's splits in the decode kernel's last program instead of a second launch was tried "
        f"(`decode_ab_h200.json`, {ab['provenance']['commit']} against {ab['old_commit']}): the same bits in every "
        f"case, the kernel {b1['speedup']:.2f}x at batch 1 and {b64['speedup']:.2f}x at batch 64, but end to end "
        "no gain beyond the runs' spread (nano's bf16 runs came out slower: the engine_ab_h200.json of 3f4f9c7 in "
        "git), so it was not kept"
    )


def run_profile(name: str, kv: str) -> str:
    """One line from a `throughput.py --profile` file over a whole run: wall and GPU time per step, and the decode
    attention's share."""
    data = load(name)
    if not data:
        return "(no profile file)"
    prof = runs_by_kv(data)[kv]["profile"]
    attention = sum(k["us_per_step"] for k in prof["kernels"] if "_decode_" in k["name"]) / 1e3
    return (
        f"profiled over a whole run, a step took {prof['wall_ms_per_step']:.2f} ms of wall time and kept the GPU busy "
        f"{prof['gpu_ms_per_step']:.2f} ms, {attention:.2f} ms of it decode attention (`{name}`)"
    )


def head64_fp8_note() -> str:
    """The attention kernels' GPU time per step, fp8 against bf16, from the whole-run profiles at batch 256 and 128."""
    parts = []
    for batch in (256, 128):
        data = load(f"profile_run_llama1b_b{batch}_h200.json")
        if not data:
            continue
        kv = runs_by_kv(data)
        ms = {
            (kernel, k): sum(r["us_per_step"] for r in kv[k]["profile"]["kernels"] if kernel in r["name"]) / 1e3
            for kernel in ("_decode_split_", "_extend_")
            for k in kv
        }
        parts.append(
            f"batch {batch}: decode kernel {ms['_decode_split_', 'fp8']:.2f} ms a step against bf16's "
            f"{ms['_decode_split_', 'auto']:.2f}, extend kernel {ms['_extend_', 'fp8']:.2f} against "
            f"{ms['_extend_', 'auto']:.2f}"
        )
    if not parts:
        return "(no profile file)"
    return (
        "whole runs profiled (prompt 512, 64 new; `profile_run_llama1b_b*_h200.json`): " + "; ".join(parts) + ". "
        "These runs split a mixed step's decode tokens off to the decode kernel (commit 1e31adf); that split is off "
        "again (with it one API server streamed a burst of 256 requests far slower: the serve_h200.json of "
        "a10c274 in git), so in a step that carries "
        "a prompt chunk of more than 16 tokens each decode token again gets a 64-row extend tile for its one row and "
        "dequantizes its whole context there"
    )


def gemm_floor(run_file: dict, batch: int) -> tuple[float, float, float] | None:
    """(us a layer, LM head GB, ms a step) of the GEMMs alone at a decode batch size: a layer's four projections, each
    at the faster of cuBLAS and our skinny GEMM timed alone (`tune_linear_h200.json`), times the layers, plus the LM
    head's weights read at the run's measured copy bandwidth. Not a strict bound (kernels launched as dependents
    overlap their ends), but the rest of a step adds more than that takes away (`pdl_chain_h200.json`)."""
    tune = load("tune_linear_h200.json")
    if not tune:
        return None
    shape = SHAPES[run_file["shape"]]
    tuned = "llama-8b" if shape["hidden_size"] == 4096 else "llama-1b"
    rows = [r for r in tune["rows"] if r["m"] == batch and r["shape"].split()[0] == tuned]
    layer_us = sum(min(r["cublas_us"], r["triton_us"]) for r in rows)
    head_bytes = shape["vocab_size"] * shape["hidden_size"] * 2
    head_us = head_bytes / (run_file["bandwidth_gbs"]["measured_copy"] * 1e3)
    return layer_us, head_bytes / 1e9, (layer_us * shape["num_hidden_layers"] + head_us) / 1e3


def gemm_floor_text(run_file: dict, batch: int) -> str:
    """gemm_floor in words."""
    layer_us, head_gb, step_ms = gemm_floor(run_file, batch)
    layers = SHAPES[run_file["shape"]]["num_hidden_layers"]
    return (
        f"the GEMMs alone: a layer's four projections at batch {batch}, each at its faster kernel timed alone "
        f"(`tune_linear_h200.json`), take {layer_us:.1f} us, so {layers} layers and the LM head's {head_gb:.2f} GB "
        f"at the measured copy bandwidth take {step_ms:.2f} ms a step"
    )


def gemm_floor_note(lat: dict, target: int) -> str:
    """What the GEMMs alone allow at batch 1 (gemm_floor), and Llama-3.2-1B's 16 layers of GEMMs launched as
    dependents. Below the target, these GEMMs leave the rest of the step no time at all."""
    floor = gemm_floor(lat, 1)
    if not floor:
        return ""
    step_ms = floor[2]
    chain = load("pdl_chain_h200.json")  # Llama-3.2-1B's 16 layers of GEMMs, a small kernel before each
    chained = ""
    if chain and SHAPES[lat["shape"]]["hidden_size"] == 2048:
        head_ms = step_ms - floor[0] * SHAPES[lat["shape"]]["num_hidden_layers"] / 1e3
        chain_ms = min(r["us"] for r in chain["rows"] if r["m"] == 1) / 1e3 + head_ms
        chained = (
            f"; launched as dependents, with the small kernels between them (`pdl_chain_h200.json`), "
            f"{chain_ms:.2f} ms: {1e3 / chain_ms:,.0f} tok/s"
        )
    verdict = "below" if 1e3 / step_ms < target else "above"
    return f"; {gemm_floor_text(lat, 1)}: {1e3 / step_ms:,.0f} tok/s if nothing else ran, {verdict} the target{chained}"


def batch64_floor(fixed: dict) -> tuple[float, float] | None:
    """(decode attention us a layer, ms a step together with the GEMMs): the Llama-3.2-1B batch-64 step's GEMMs
    alone (gemm_floor) plus its decode attention kernel alone at this shape (bf16,
    `decode_attention_split_sizes_h200.json`)."""
    floor, splits = gemm_floor(fixed, 64), load("decode_attention_split_sizes_h200.json")
    if not floor or not splits:
        return None
    attn = [r for r in splits["split_sizes"] if r["shape"] == "llama-1b b64 ctx640" and "bfloat16" in r["cache"]]
    attn_us = attn[0]["default_us"]
    return attn_us, floor[2] + attn_us * SHAPES[fixed["shape"]]["num_hidden_layers"] / 1e3


def batch64_floor_note(fixed: dict, target_ms: float) -> str:
    """batch64_floor in words: what the GEMMs and the decode attention leave of the target."""
    floor = batch64_floor(fixed)
    if not floor:
        return ""
    attn_us, both = floor
    verdict = "over" if both > target_ms else "under"
    return (
        f"; {gemm_floor_text(fixed, 64)}, and the decode attention kernel alone at this shape (context 640) "
        f"{attn_us:.1f} us a layer (`decode_attention_split_sizes_h200.json`): {both:.2f} ms "
        f"together, {verdict} the target before any norm, RoPE or KV write"
    )


def batch64_floor_gist(fixed: dict, target_ms: float) -> str:
    """batch64_floor in a clause of the README's brief list."""
    floor = batch64_floor(fixed)
    if not floor:
        return ""
    verdict = "over" if floor[1] > target_ms else "under"
    return (
        f": the projections and the LM head, each at its fastest alone, and the decode attention kernel alone take "
        f"{floor[1]:.2f} ms, {verdict} the target before any other kernel"
    )


def gemm_floor_gist(lat: dict, target: int) -> str:
    """gemm_floor at batch 1 in a clause of the README's brief list."""
    if not (floor := gemm_floor(lat, 1)):
        return ""
    tok_s = 1e3 / floor[2]
    verdict = "below" if tok_s < target else "above"
    return (
        f"; its projections and LM head alone, each at its fastest, would run {tok_s:,.0f} tok/s, {verdict} the target"
    )


def small_batch_decode_note() -> str:
    """The decode kernel at batch 1 and 8: the best of warps x pipeline depth against the default (the same bits),
    and shorter splits (other bits, hence opt-in)."""
    data, splits = load("decode_attention_small_batch_h200.json"), load("decode_attention_split_sizes_h200.json")
    if not data or not splits:
        return ""
    rows = data["small_batches"]
    best = max(rows, key=lambda r: r["speedup"])
    sized = {(r["shape"], r["split_tokens"]): r for r in splits["split_sizes"] if "bfloat16" in r["cache"]}
    b1, b1_64 = sized[("llama-1b b1 ctx640", 512)], sized[("llama-1b b1 ctx640", 64)]
    big, big_1k = sized[("llama-1b b256 ctx576", 512)], sized[("llama-1b b256 ctx576", 1024)]
    return (
        f"; the decode kernel's launch is not what holds it: over 2-8 warps and pipeline depths 1-4 (every one "
        f"bit-identical) the best at batch 1 and 8 is {best['speedup']:.2f}x the default ({best['shape']}, "
        "`decode_attention_small_batch_h200.json`); its split size is: a split walks its KV tiles one after "
        f"another, and at Llama-3.2-1B's batch 1 the kernel takes {b1['us']:.1f} us a layer in 512-token splits, "
        f"{b1_64['us']:.1f} us in 64-token ones, while batch 256 wants the opposite ({big['us']:.0f} us, "
        f"{big_1k['us']:.0f} us in one split a sequence; `decode_attention_split_sizes_h200.json`). Splits sized by "
        "the batch make a sequence's result depend on its batch, so they are opt-in "
        '(`decode_splits="by-batch"`)'
    )


def gemm_note(batch: int) -> str:
    """The small GEMMs at one decode batch size: our own skinny GEMM against cuBLAS, a layer's kernel chain launched
    as programmatic dependents (PDL), and what the engine's dependent launch does end to end."""
    tune, chain, ab = load("tune_linear_h200.json"), load("pdl_chain_h200.json"), load("dependent_launch_h200.json")
    if not tune or not chain or not ab:
        return ""
    mine = [r for r in tune["rows"] if r["m"] == batch and r["shape"].startswith("llama-1b")]
    low, high = min(r["speedup"] for r in mine), max(r["speedup"] for r in mine)
    us = {r["variant"]: r["us"] for r in chain["rows"] if r["m"] == batch}
    rows = {w: v["rows"] for w, v in ab["workloads"].items()}
    chain_text = (
        f"16 layers' GEMMs with a small kernel before each, {us['cublas']:.0f} us with cuBLAS, {us['triton']:.0f} us "
        f"with the Triton GEMM, {us['triton+pdl']:.0f} us launched as dependents (the same bits; "
        "`pdl_chain_h200.json`)"
    )
    head = (
        f". The small GEMMs are bound by their start and end, not by cuBLAS: a skinny Triton GEMM of our own runs "
        f"Llama-3.2-1B's four projections at {low:.2f}-{high:.2f}x cuBLAS's speed at batch {batch} "
        "(`tune_linear_h200.json`)"
    )
    if batch > 1:
        verdict = "beat it" if us["triton+pdl"] < us["cublas"] else "still lose to it"
        chained = f"launched as programmatic dependents they {verdict}: {chain_text}{early_note(us)}"
        return f"{head}; {chained}. {end_to_end(rows)}{silu_note(us, batch)}"
    lat = [r for w in ("latency_1", "latency_2") for r in rows.get(w, [])]
    big = rows.get("latency_llama8b", [])
    pairs = ", ".join(f"{r['old_tok_s']:.0f} -> {r['new_tok_s']:.0f}" for r in lat)
    eight = f", Llama-3.1-8B {big[0]['old_tok_s']:.0f} -> {big[0]['new_tok_s']:.0f}" if big else ""
    return (
        f"{head}; what helps is starting each kernel while the one before finishes (programmatic dependent launch): "
        f"{chain_text}{early_note(us)}. The engine launches so in passes of up to {DEPENDENT_MAX_TOKENS} tokens on "
        "Hopper (`dependent_launch`, kernels/dependent_launch.py): batch 1 with it off against on, in one process, "
        f"both orders (`dependent_launch_h200.json`): {pairs} tok/s{eight}{silu_note(us, batch)}. Under the profiler "
        "a dependent kernel's time includes its wait, so the profile above is of ordinary launches (its file's commit)"
    )


def silu_note(us: dict, batch: int) -> str:
    """The gate/up GEMM applying the SiLU·mul in its epilogue: the layer chain, and end to end against the tree
    before it (batch 1: both decode_splits; batch 64: both KV dtypes)."""
    ab, fused = load("mlp_silu_ab_h200.json"), us.get("triton+pdl+silu")
    if not ab or fused is None:
        return ""
    rows = ab["workloads"]["latency" if batch == 1 else "fixed"]["rows"]
    if batch == 1:
        runs = ", ".join(f"{run_label_of(r)} {r['old_tok_s']:.0f} -> {r['new_tok_s']:.0f} tok/s" for r in rows)
    else:
        runs = ", ".join(f"{run_label_of(r)} {r['new_vs_old']:.2f}x" for r in rows)
    nano = [r["new_vs_old"] for w, v in ab["workloads"].items() if w.startswith("nano") for r in v["rows"]]
    return (
        f". Since {ab['commit']} the gate/up GEMM applies the SiLU·mul to its tiles before storing them "
        f"(`linear_silu_and_mul`: the same bits, one launch a layer fewer): the chain above {us['triton+pdl']:.0f} -> "
        f"{fused:.0f} us; side by side with {ab['old_commit']} (`mlp_silu_ab_h200.json`): {runs} (nano, mostly "
        f"passes of more than {DEPENDENT_MAX_TOKENS} tokens: {min(nano):.2f}-{max(nano):.2f}x)"
    )


def run_label_of(row: dict) -> str:
    """An A/B row's run label as the README names it: bf16 for the default KV dtype."""
    return row["config"].replace("auto", "bf16")


def early_note(us: dict) -> str:
    """The chain with every GEMM releasing its dependents at its start instead of after its main loop."""
    if us["triton+pdl-early"] >= us["triton+pdl"]:
        return (
            f", and {us['triton+pdl-early']:.0f} us when each kernel lets the next one start at its beginning rather "
            "than after its main loop (the kernels further down then wait on the GPU and hold it)"
        )
    ab = load("release_point_ab_h200.json")
    measured = ""
    if ab:
        med = ab["median_decode_step_ms"]
        rounds = len(ab["runs"]) // 2
        measured = (
            f", but end to end batch 64 is not faster with its 64-row GEMMs released so (median decode step "
            f"{med['start']:.3f} ms against {med['after_loop']:.3f}, {rounds} alternated rounds, "
            "`release_point_ab_h200.json`), so the engine releases after the loop at every size"
        )
    return f"; {us['triton+pdl-early']:.0f} us when each GEMM lets the next kernel start at its beginning{measured}"


def end_to_end(rows: dict) -> str:
    """Batch 64 with the engine's dependent launch on against off (Triton GEMMs against cuBLAS), one process."""
    fixed = rows.get("fixed", [])
    if not fixed:
        return ""
    pairs = ", ".join(
        f"{run_label_of(r)} {r['new_vs_old']:.2f}x throughput ("
        f"{r['old_decode_step_ms']:.2f} -> {r['new_decode_step_ms']:.2f} ms a step, averaged over the run)"
        for r in fixed
    )
    return (
        f"The engine launches passes of up to {DEPENDENT_MAX_TOKENS} tokens so on Hopper, their projections on the "
        f"Triton GEMM: batch 64 with `dependent_launch` off against on, in one process "
        f"(`dependent_launch_h200.json`): {pairs}"
    )


def nano_splits_note() -> str:
    """nano with decode_splits by-length and by-batch, side by side in one run."""
    data = load("throughput_nano_splits_h200.json")
    if not data:
        return ""
    plain, fast = runs_by_kv(data), by_batch_runs(data)
    base = plain["fp8"]["output_tok_s"] / plain["auto"]["output_tok_s"]
    ratio = fast["fp8"]["output_tok_s"] / fast["auto"]["output_tok_s"]
    return (
        f'; opt-in `decode_splits="by-batch"` (`throughput_nano_splits_h200.json`, beside the default in one run: '
        f"{base:.2f}x): bf16 {fmt(fast['auto']['output_tok_s'])}, fp8 {fmt(fast['fp8']['output_tok_s'])} tok/s = "
        f"{ratio:.2f}x"
    )


def decode_profile(name: str) -> str:
    """One line from a `throughput.py --profile` file: the step's GPU time split into GEMMs, attention and the rest."""
    data = load(name)
    if not data:
        return "(no profile file)"
    run = runs_by_kv(data)["auto"]
    parts = profile_parts(run["profile"])
    split = ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items())
    step, busy = run["decode_step_ms_direct"], run["profile"]["gpu_ms_per_step"]
    fast = by_batch_runs(data).get("auto")
    opt_in = ""
    if fast:
        opt_in = (
            f'; with `decode_splits="by-batch"` a {fast["decode_step_ms_direct"]:.2f} ms step, decode attention '
            f"{profile_parts(fast['profile'])['decode attention']:.2f} ms"
        )
    return f"in a profiled run, a {step:.2f} ms step kept the GPU busy {busy:.2f} ms ({split}{opt_in}; `{name}`)"


def profile_parts(prof: dict) -> dict[str, float]:
    """A profile's GPU milliseconds a step in GEMMs (cuBLAS), decode attention (both stages) and the rest."""
    parts = {"GEMMs": 0.0, "decode attention": 0.0, "other": 0.0}
    for k in prof["kernels"]:
        name = k["name"]
        key = "GEMMs" if ("nvjet" in name or "gemm" in name.lower() or "cublas" in name) else "other"
        key = "decode attention" if "_decode_" in name else key
        parts[key] += k["us_per_step"] / 1e3
    return parts


def extend_why() -> str:
    """The 32k-prompt row's reason, from the extend-kernel sweep: the default launch against the one before."""
    sweep = load("extend_attention_variants_h200.json")
    if not sweep:
        return "extend kernel launch variants: no sweep file"
    ms = {r["variant"]: r["ms"] for r in sweep["rows"] if r["shape"] == "qwen3-0.6b" and r["cache"] == "bf16"}
    return (
        "the extend kernel's launch is picked by shape (`extend_attention.launch_config`): no causal masks below the "
        "diagonal, and 128-row query tiles with a register cap for long bf16 prompts; the same bits, "
        f"{ms['plain'] / ms['default']:.2f}x faster per layer at 32k ({ms['default']:.1f} vs {ms['plain']:.1f} ms; "
        f"SDPA over the whole prompt {ms['torch sdpa (whole prompt)']:.1f} ms; `extend_attention_variants_h200.json`)"
    )


def pair_rows(shape: str) -> dict[str, dict]:
    """decode_attention_fp8_pairs_h200.json's rows at a shape, by FP8 decode variant."""
    data = load("decode_attention_fp8_pairs_h200.json")
    return {r["variant"]: r for r in data["fp8_variants"] if r["shape"] == shape}


def pair_speedup(shape: str, variant: str = "default") -> str:
    """An FP8 decode variant's speed over bf16's at a shape of decode_attention_fp8_pairs_h200.json."""
    return f"{pair_rows(shape)[variant]['speedup_vs_bf16']:.2f}x"


def pair_read_note(shape: str) -> str:
    """What the pair read of V changed at a shape: the kernel's time against the byte read's, and its accuracy."""
    case = pair_rows(shape)
    d, hw = case["default"], case["hw"]
    return (
        "the FP8 decode kernel reads V in int16 words of two head_dim columns, transposed by ldmatrix like a bf16 "
        "tile, and runs P.V as two dots (`decode_attention.pv_by_pairs`) instead of gathering the V tile one byte "
        f"per shared-memory load: at this shape {d['us']:.0f} us against {hw['us']:.0f} us "
        f"({hw['us'] / d['us']:.2f}x); the MMA packs its operands differently, so some outputs move by an ulp, "
        f"no less accurate: max / mean error against a float64 answer {d['max_abs_err_fp64']:.3e} / "
        f"{d['mean_abs_err_fp64']:.4e}, the byte read's {hw['max_abs_err_fp64']:.3e} / {hw['mean_abs_err_fp64']:.4e} "
        "(`decode_attention_fp8_pairs_h200.json`)"
    )


def nano_runs_note() -> str:
    """nano's fp8/bf16 ratio moves with the bf16 run: the pair-read runs of this file's history, side by side."""
    data = load("throughput_nano_h200.json")
    kv = runs_by_kv(data)
    hw = variant_run(data, "hw")
    gain = kv["fp8"]["output_tok_s"] / hw["output_tok_s"] if hw else None
    same_run = f"the pair read {gain:.2f}x the byte read in the same run; " if gain else ""
    spread = "nano's ratio moves with the run-to-run spread of both runs (this file's history in git)"
    return same_run + spread + nano_h100_note()


def nano_h100_note() -> str:
    """nano on an H100 beside the H200's, bf16 and fp8 alternated over rounds (medians) where the file has them."""
    data = load("throughput_nano_h100.json")
    kv = runs_by_kv(data) if data else {}
    if "fp8" not in kv or "auto" not in kv:
        return ""
    bf16, fp8 = kv["auto"]["output_tok_s"], kv["fp8"]["output_tok_s"]
    rounds = len(data.get("rounds", []))
    how = f"alternated over {rounds} rounds (`throughput_nano_h100.json`, medians)" if rounds > 1 else "one run each"
    return (
        f"; on an {data['gpu']}, whose memory is slower, {how}: bf16 {fmt(bf16)}, fp8 {fmt(fp8)} tok/s = "
        f"{fp8 / bf16:.2f}x"
    )


def kernel_bandwidth_note(case: str) -> str:
    """How near the measured copy bandwidth the bf16 and FP8 decode kernels read a case's KV
    (decode_attention_fp8_pairs_h200.json; the copy bandwidth of throughput_nano_h200.json, the same GPU model)."""
    shape, batch, ctx = re.fullmatch(r"(\S+) b(\d+) ctx(\d+)", case).groups()
    cfg = SHAPES[shape]
    elements = int(batch) * int(ctx) * cfg["num_key_value_heads"] * cfg["head_dim"] * 2  # K and V, one layer
    copy_gbs = load("throughput_nano_h200.json")["bandwidth_gbs"]["measured_copy"]
    row = pair_rows(case)["default"]
    bf16, fp8 = (100 * elements * size / (us * 1e3) / copy_gbs for size, us in ((2, row["bf16_us"]), (1, row["us"])))
    return (
        f"at this shape the bf16 kernel reads its KV at {bf16:.0f}% of the measured copy bandwidth, the FP8 kernel "
        f"at {fp8:.0f}% (`decode_attention_fp8_pairs_h200.json`): half the bytes, but each one converted to fp16 "
        "on the way, work the bf16 kernel does not do"
    )


def nano_host_note() -> str:
    """nano's engine thread timed phase by phase (throughput.py --host-split): the H200 file's, else the H100's."""
    for name in ("throughput_nano_h200.json", "throughput_nano_h100.json"):
        data = load(name)
        split = (runs_by_kv(data) if data else {}).get("fp8", {}).get("host_ms_per_step")
        if split:
            break
    else:
        return ""
    own = split["engine_step"] - split["wait"]
    return (
        f"; the engine's thread is not what holds it back: timed phase by phase on an {data['gpu']} (`--host-split`, "
        f"`{name}`, medians), its own work (launching a step, reading and appending its tokens) "
        f"is {own:.2f} ms of a {split['engine_step']:.2f} ms fp8 step, done while the GPU runs the step launched "
        f"before, and for the other {split['wait']:.2f} ms it waits for the GPU"
    )


def nano_h100_gist() -> str:
    """nano's fp8/bf16 ratio on an H100 (nano_h100_note) in a clause of the README's brief list."""
    kv = runs_by_kv(data) if (data := load("throughput_nano_h100.json")) else {}
    if "fp8" not in kv or "auto" not in kv:
        return ""
    ratio = kv["fp8"]["output_tok_s"] / kv["auto"]["output_tok_s"]
    return f"; on an H100, whose memory is slower, {ratio:.2f}x (`throughput_nano_h100.json`)"


def ncu_summary() -> str:
    """Registers, occupancy and DRAM throughput of the fp8 and bf16 decode kernels, from the ncu file."""
    path = RESULTS / "decode_attention_ncu_h200.txt"
    if not path.is_file():
        return "no ncu profile recorded"
    text = path.read_text()
    stats = {}
    for cache in ("fp8", "bf16"):
        part = text.split(f"## cache {cache}")[1].split("## cache")[0]

        def value(label: str, part: str = part) -> str:
            return re.search(rf"{label} \S+ ([\d.]+)", part).group(1)

        stats[cache] = (value("Registers Per Thread"), value("Achieved Occupancy"), value("DRAM Throughput"))
    f, b = stats["fp8"], stats["bf16"]
    return (
        f"ncu: the FP8 kernel holds {f[0]} registers a thread ({f[1]}% occupancy) and reaches {f[2]}% of DRAM "
        f"bandwidth, issue-bound on integer work; bf16: {b[0]} registers, {b[1]}% occupancy, {b[2]}% of DRAM "
        "(`decode_attention_ncu_h200.txt`)"
    )


def fp8_vs_bf16_worst(by_batch: bool = False) -> tuple[float, str] | None:
    """The lowest fp8/bf16 output-throughput ratio over every measured configuration with batch >= 8: of the
    default runs, or of the decode_splits="by-batch" runs where a file has them."""
    pairs = []
    select = by_batch_runs if by_batch else runs_by_kv
    nano = load("throughput_nano_splits_h200.json" if by_batch else "throughput_nano_h200.json")
    files = {"nano": nano, "Llama-3.2-1B batch 64": load("throughput_fixed_llama1b_h200.json")}
    files["Llama-3.1-8B batch 64"] = load("throughput_fixed_llama8b_h200.json")
    for where, data in files.items():
        kv = select(data) if data else {}
        if "fp8" in kv and "auto" in kv:
            pairs.append((kv["fp8"]["output_tok_s"] / kv["auto"]["output_tok_s"], where))
    sweep = load("throughput_sweep_llama1b_h200.json")
    points = sweep_ratios(select(sweep) if sweep else {})
    pairs += [(ratio, f"Llama-3.2-1B sweep batch {batch}") for ratio, batch in points]
    return min(pairs) if pairs else None


def sweep_rounds_note() -> str:
    """How the sweep's bf16 and fp8 runs were ordered: alternated over rounds (throughput.py --rounds) or not."""
    sweep = load("throughput_sweep_llama1b_h200.json") or {}
    rounds = len(sweep.get("rounds", []))
    if rounds > 1:
        note = f"its numbers are medians of {rounds} rounds that alternate bf16 and fp8"
    else:
        note = "its file ran each KV dtype's repeats back to back, which `h200_suite.sh sweep` now alternates"
    return note + sweep_spread_note(load("throughput_sweep_llama1b_h100.json"), "`throughput_sweep_llama1b_h100.json`")


def sweep_h100_gist() -> str:
    """The H100 sweep's alternated rounds (sweep_spread_note) in a clause of the README's brief list."""
    sweep = load("throughput_sweep_llama1b_h100.json")
    if not sweep or len(sweep.get("rounds", [])) < 2:
        return ""
    each = [ratio for runs in sweep["rounds"] for ratio, _ in sweep_ratios(runs_by_kv({"runs": runs}))]
    where = f"alternated over {len(sweep['rounds'])} rounds on an H100 (`throughput_sweep_llama1b_h100.json`)"
    if min(each) >= 1:
        return f"; {where}, FP8 was at or above bf16 at every point of every round"
    return f"; {where}, the rounds' ratios spread over {min(each):.2f}-{max(each):.2f}"


def sweep_ratios(kv: dict[str, dict]) -> list[tuple[float, int]]:
    """(fp8/bf16 output tok/s, batch) at each sweep point of batch >= 8 of a sweep's runs by KV dtype (runs_by_kv);
    none where it lacks either."""
    if "fp8" not in kv or "auto" not in kv:
        return []
    pairs = zip(kv["auto"]["sweep"], kv["fp8"]["sweep"])
    return [(f["output_tok_s"] / b["output_tok_s"], b["batch"]) for b, f in pairs if b["batch"] >= 8]


def sweep_spread_note(sweep: dict | None, name: str) -> str:
    """How far apart a sweep's alternated rounds put fp8 and bf16: the spread of the rounds' ratios and of their
    medians, at batch >= 8."""
    if not sweep or len(sweep.get("rounds", [])) < 2:
        return ""
    each = [ratio for runs in sweep["rounds"] for ratio, _ in sweep_ratios(runs_by_kv({"runs": runs}))]
    medians = [ratio for ratio, _ in sweep_ratios(runs_by_kv(sweep))]
    verdict = (
        "fp8 at or above bf16 at every point of every round of that run (single points have moved by more between "
        "sessions: the file's history in git)"
        if min(each) >= 1
        else "these 64-token runs, mostly prompt passes, cannot settle a few percent"
    )
    return (
        f"; alternated so on an {sweep['gpu']} ({name}, {len(sweep['rounds'])} rounds), the rounds' fp8/bf16 ratios "
        f"at batch >= 8 spread over {min(each):.2f}-{max(each):.2f} and their medians over "
        f"{min(medians):.2f}-{max(medians):.2f}: {verdict}"
    )


def render_throughput() -> str:
    rows = throughput_rows()
    if not rows:
        return "No H200 throughput results yet.\n"
    lines = ["| # | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {i} | {r.target} | {r.measured} | {r.met} |" for i, r in enumerate(rows, 1)]
    lines += [
        "",
        "Why each row stands where it does, in brief (the profiles and side-by-side runs behind each reason: "
        f"[benchmarks/results/README.md]({WHY_LINK})):",
        "",
    ]
    lines += [f"{i}. {r.gist}" for i, r in enumerate(rows, 1)]
    nano = load("throughput_nano_h200.json")
    if nano:
        lines.append("")
        lines.append(
            f"Measured with `benchmarks/throughput.py` on an {nano.get('gpu')} (torch {nano.get('torch')}, triton "
            f"{nano.get('triton')}); commands and commits in each `benchmarks/results/throughput_*_h200.json`."
        )
    if (RESULTS / "throughput_sweep_llama1b_h200.png").is_file():
        lines += ["", "![decode tok/s against batch size](benchmarks/results/throughput_sweep_llama1b_h200.png)"]
    return "\n".join(lines) + "\n"


def render_throughput_why() -> str:
    """The README table's reasons in full: every profile and side-by-side run behind each row, numbered as there."""
    rows = throughput_rows()
    lines = [
        f"{i}. **{r.target}**: {r.measured}. Met: {r.met}.\n   {r.why[:1].upper()}{r.why[1:]}"
        for i, r in enumerate(rows, 1)
    ]
    return "\n".join(lines) + "\n" if rows else "No H200 throughput results yet.\n"


def render_throughput_details() -> str:
    """Every throughput result file, one line per configuration."""
    lines = [
        "| file | workload | configuration | output tok/s | decode step (ms) | % roofline (copy BW) |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("throughput_*_h200.json")):
        result = json.loads(path.read_text())
        for run in result["runs"]:
            items = run.get("sweep") or [run]
            for r in items:
                if "output_tok_s" not in r:
                    continue
                step = f"{r['decode_step_ms_direct']:.2f}" if "decode_step_ms_direct" in r else "-"
                label = result["workload"] + (f" b{r['batch']}" if "batch" in r else "")
                lines.append(
                    f"| `{path.name}` | {label} | {run_label(run)} | {fmt(r['output_tok_s'])} | {step} | "
                    f"{fmt(r.get('pct_roofline_measured_copy', 0))} |"
                )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- kernels, checks and speculative decoding


def table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table; `align` is one character per column, "l" or "r" (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = [header, rule, *[[str(c) for c in r] for r in rows]]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def x(ratio: float) -> str:
    return f"{ratio:.2f}×"


def pct(value: float) -> str:
    return f"{value:.0%}"


def num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


# ------------------------------------------------------------------------------------------------ kernels


def kv_write() -> str:
    k = load("kernels_h100.json")
    rows = [
        [r["tokens"], num(r["fused_us"], 2), num(r["two_launch_us"], 2), x(r["speedup"]), num(r["fused_gbs"]),
         pct(r["fused_gbs"] / k["copy_bandwidth_gbs"]), "yes" if r["same_bytes"] else "**no**"]
        for r in k["kv_write"]
    ]  # fmt: skip
    header = ["tokens", "fused µs", "two-launch µs", "speedup", "fused GB/s", "of measured copy", "same bytes"]
    return table(header, rows, "rrrrrrl")


def decode_attention() -> str:
    k = load("kernels_h100.json")
    rows_by = {(r["cache"], r["batch"], r["context"]): r for r in k["decode"]}
    peak = k["nominal_peak_gbs"]
    rows = []
    for (cache, batch, context), r in rows_by.items():
        if cache != "bfloat16":
            continue
        f = rows_by.get(("float8_e4m3fn", batch, context))
        sdpa = f"{r['us'] / r['sdpa_us']:.2f}" if r.get("sdpa_us") else "–"
        rows.append([
            f"{batch} × {context}", num(r["us"], 1), pct(r["gbs"] / peak), num(f["us"], 1), pct(f["gbs"] / peak),
            x(r["us"] / f["us"]), sdpa,
        ])  # fmt: skip
    header = ["batch × context", "bf16 µs", "bf16 % of peak", "fp8 µs", "fp8 % of peak", "fp8 speedup",
              "bf16 time / SDPA time"]  # fmt: skip
    return table(header, rows)


def attention_failure(r: dict) -> str:
    """One attention check that is off: which case, and whether its error or its bits (an opt-in read checked
    for bit-identity with the default) made it so."""
    case = f"{r['kind']} {r['cache']} head_dim {r['head_dim']} q×{r['q_mult']:g} fp8_decode={r['fp8_decode']}"
    if r.get("identical_to_auto") is False:
        return f"{case} (not bit-identical to auto; err {r['max_abs_err']:.3g})"
    return f"{case} (err {r['max_abs_err']:.3g})"


def newest(*names: str) -> tuple[str, dict] | None:
    """The newest run (by its provenance date) among result files of one check on different GPUs (`_h200`,
    `_h100`): the correctness table shows the current code's last run, wherever it ran."""
    runs = [(meta(d).get("date") or "", name, d) for name in names if (d := load(name))]
    if not runs:
        return None
    _, name, data = max(runs)
    return name, data


def result_label(name: str, data: dict) -> str:
    p = meta(data)
    return f"`{name}` ({p.get('commit') or '?'}, {p.get('device') or '?'})"


def skinny_gemm_rows(engine_check: dict) -> list[list[str]]:
    """The decode projections' Triton GEMM against fp64 and cuBLAS, and greedy outputs with dependent launch."""
    found = newest("kernel_checks_skinny_linear_h200.json", "kernel_checks_skinny_linear_h100.json")
    dep = engine_check.get("dependent_launch")
    rows = []
    if found:
        r = found[1]["skinny_linear"]
        n = len(r)
        rows.append([
            f"the skinny Triton GEMM (bf16, Llama/Qwen projection shapes, {min(x['m'] for x in r)}-"
            f"{max(x['m'] for x in r)} rows) vs an fp64 product ({result_label(*found)})",
            f"{sum(x['err_over_bound'] <= 1 for x in r)}/{n} within half a bf16 ulp plus fp32 accumulation (cuBLAS "
            f"{sum(x['cublas_err_over_bound'] <= 1 for x in r)}/{n}); launched as a dependent = launched plainly, bit "
            f"for bit: {sum(x['dependent_bits_equal'] for x in r)}/{n}; a row's bits the same whatever rows come with "
            f"it: {sum(x['row0_equals_m1'] for x in r)}/{n} (cuBLAS {sum(x['cublas_row0_equals_m1'] for x in r)}/{n})",
        ])  # fmt: skip
    if dep:
        rows.append([
            "dependent launch with the Triton GEMM vs ordinary launches with cuBLAS, greedy (demo model)",
            "; ".join(f"{k}: {v['identical_sequences']}/{v['of']} identical" for k, v in dep.items()),
        ])  # fmt: skip
    return rows


KERNEL_CHECK_FILES = ("kernel_checks_h200.json", "kernel_checks_h100.json")
# kernel_checks_*.json run the attention checks with every other kernel check; a run of them alone may follow
ATTENTION_CHECK_FILES = (*KERNEL_CHECK_FILES, "kernel_checks_attention_h200.json")
ENGINE_CHECK_FILES = ("engine_check_h200.json", "engine_check_h100.json")


def gpu_correctness() -> str:
    (k_file, k), (e_file, e) = newest(*KERNEL_CHECK_FILES), newest(*ENGINE_CHECK_FILES)
    exact, rope = k["cache_write_exact"], k.get("rope_write_exact")
    att_file, att_run = newest(*ATTENTION_CHECK_FILES)
    att = att_run["attention_vs_reference"]
    failed = [attention_failure(r) for r in att if not r["ok"]]
    off = f"; off: {'; '.join(failed)}" if failed else ""
    lossless = e["lossless"]
    writes = e["fused_vs_reference_writes"]
    layer = e["layer_ops"]
    ulps = ", ".join(
        f"{d}: RMSNorm {v['rms_norm_max_ulp']:.1f}, SiLU·mul {v['silu_and_mul_max_ulp']:.1f}" for d, v in layer.items()
    )
    rows = [
        ["the runs below (file, commit, GPU)",
         f"kernels: {result_label(k_file, k)}; engine: {result_label(e_file, e)}"],
        ["fused KV write vs the reference bytes, all 65,536 bf16 and fp16 patterns × scales × formats, plain caches",
         f"{sum(r['mismatches'] for r in exact)} mismatching bytes over {len(exact)} combos"],
        *([["the rotating KV write (RoPE on the way) vs the torch path: q, k and pages, bf16/fp16/fp32 into FP8 "
            "and bf16 caches", f"{sum(r['mismatches'] for r in rope)} mismatching bytes, q/k equal in "
            f"{sum(r['qk_bits_equal'] for r in rope)}/{len(rope)} combos"]] if rope else []),
        [f"paged attention kernels vs the torch reference ({result_label(att_file, att_run)})",
         f"{sum(r['ok'] for r in att)}/{len(att)} within tolerance{off}"],
        ["CUDA-graph replay vs eager (plain, speculative; bf16 and fp8 KV)",
         f"{sum(v['identical'] for v in e['graphs_vs_eager'].values())}/{len(e['graphs_vs_eager'])} identical"],
        ["speculative vs plain greedy (bf16/fp8 KV × k)",
         f"{sum(v['identical'] for v in lossless.values())}/{len(lossless)} identical, mean acceptance "
         f"{min(v['mean_acceptance_length'] for v in lossless.values()):.2f}–"
         f"{max(v['mean_acceptance_length'] for v in lossless.values()):.2f}"],
        ["Triton vs torch backend, greedy",
         "; ".join(f"{n}: {v['identical_sequences']}/{v['of']} identical" for n, v in e["backends"].items())],
        ["every KV write through the fused kernel vs the torch reference (speculative, fp8)",
         f"target pool equal: {writes['target_kv_bytes_equal']}, draft pool equal: {writes['draft_kv_bytes_equal']}, "
         f"outputs identical: {writes['outputs_identical']}"],
        ["fused layer ops vs torch (max ulp)", ulps],
        *skinny_gemm_rows(e),
    ]  # fmt: skip
    so = e.get("structured_outputs")
    if so:
        same = f"identical on 1 vs 4 threads: {so['threads_1_equals_4']}"
        if "background_equals_foreground" in so:
            same += (
                f", helper vs engine thread: {so['background_equals_foreground']}, overlapped vs stepwise: "
                f"{so['overlapped_equals_stepwise']}"
            )
        rows.append(["seeded JSON-schema sampling (masks on 1 or 4 threads, the helper or the engine's thread, "
                     "overlapped or stepwise)", f"{so['valid']}/{so['of']} valid, {same}"])  # fmt: skip
    rows += kernel_masks_rows(e) + logprobs_rows(e) + penalties_rows(e)
    return table(["check", "result"], rows, "ll")


def penalties_rows(e: dict) -> list[list[str]]:
    """Penalized greedy decoding on the demo model (absent from runs before the check)."""
    p = e.get("penalties")
    if not p:
        return []
    plain, spec = p["default_vs_plain_eager"], p["speculative_vs_default"]
    return [
        [
            "penalized greedy (repetition, frequency, presence, a bad word): overlapped CUDA-graph steps vs plain "
            "eager ones; speculative (k=4) vs overlapped",
            f"{plain['identical_sequences']}/{plain['of']} identical; {spec['identical_sequences']}/{spec['of']} "
            "identical",
        ]
    ]


def kernel_masks_rows(e: dict) -> list[list[str]]:
    """Grammar masks in the sampling kernel, end to end on the demo model (absent from runs before the check)."""
    m = e.get("kernel_masks")
    if not m:
        return []
    return [
        [
            "grammar masks in the sampling kernel",
            f"constrained greedy = the torch path's tokens: {m['greedy_kernel_equals_torch']}; valid JSON: greedy "
            f"{m['greedy_valid']}/{m['greedy_of']}, unseeded samples {m['unseeded_valid']}/{m['unseeded_of']}",
        ]
    ]


def logprobs_rows(e: dict) -> list[list[str]]:
    """vLLM's Logprob objects from the GPU's sampler, end to end on the demo model (absent from runs before the
    check)."""
    if "logprobs" not in e:
        return []
    runs = {k: v for k, v in e["logprobs"].items() if isinstance(v, dict)}
    shaped = ", ".join(f"{k} {v['shaped_as_vllm']}/{v['positions']}" for k, v in runs.items())
    outside = ", ".join(f"{k} {v['sampled_outside_top3']}" for k, v in runs.items())
    return [
        [
            "logprobs as vLLM's Logprob objects",
            f"positions in vLLM's shape (sampled token first with its rank, the top 3 ranked 1..3): {shaped}; "
            f"sampled outside the top 3: {outside}; CUDA graphs = eager: {e['logprobs']['graphs_equal_eager']}",
        ]
    ]


# ------------------------------------------------------------------------------------------------ engine


def spec_rows(data: dict) -> list[list]:
    rows = []
    for r in data["rows"]:
        if r["k"] is None:
            rows.append([r["batch"], "–", num(r["tokens_per_s"]), "–", "–", "–"])
        else:
            rows.append([r["batch"], r["k"], num(r["tokens_per_s"]), x(r["speedup"]), x(r["decode_speedup"]),
                         f"{r['mean_acceptance_length']:.2f}"])  # fmt: skip
    return rows


SPEC_HEADER = ["batch", "k", "tokens/s", "speedup", "decode speedup", "mean acceptance length"]


def spec_decode() -> str:
    return table(SPEC_HEADER, spec_rows(load("spec_decode_h100.json")))


def spec_decode_variants() -> str:
    rows = []
    for label, name in (("H200, current code, greedy", "spec_decode_h200.json"),
                        ("sampled, temperature 0.8", "spec_decode_h100_sampled.json"),
                        ("fp8 KV cache", "spec_decode_h100_fp8kv.json"),
                        ("no overlapped rounds", "spec_decode_h100_no_overlap.json")):  # fmt: skip
        rows += [[label, *r] for r in spec_rows(load(name))]
    return table(["variant", *SPEC_HEADER], rows, "lrrrrrr")


def profile_spec() -> str:
    p = load("profile_spec_h100.json")
    rows = [[name, num(r["us"]), num(r["kernel_us"]), r["kernels"]] for name, r in p["replay_us"].items()]
    rows += [
        [f"{mode} decoding, per token", num(p[mode]["ms_per_token"] * 1000),
         num(p[mode]["gpu_busy_ms_per_token"] * 1000), num(p[mode]["kernels_per_token"], 1)]
        for mode in ("plain", "spec")
    ]  # fmt: skip
    return table(["captured pass", "µs per replay", "kernel µs", "kernels"], rows)


def profile_prefill() -> str:
    rows = []
    for label, name in (("CUDA graphs", "profile_prefill_h100.json"), ("eager", "profile_prefill_h100_eager.json")):
        p = load(name)
        rows.append([label, p["prompt_tokens"], num(p["plain_prompt_step_ms"], 2), num(p["spec_prompt_step_ms"], 2),
                     num(p["target.forward_ms"], 2), num(p["draft.forward_ms"], 2)])  # fmt: skip
    header = ["prompt passes", "prompt tokens", "plain step ms", "speculative step ms", "target ms", "draft ms"]
    return table(header, rows)


# ------------------------------------------------------------------------------------------------ summaries


def provenance() -> str:
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        p = meta(json.loads(path.read_text()))
        commit = p.get("commit")
        where = f"`{commit[:7]}`" + (" (dirty)" if p.get("dirty") else "") if commit else "not recorded"
        if not commit and p.get("recorded_in"):
            where += f"; file added in `{p['recorded_in'][:7]}`"
        versions = p.get("versions") or {}
        stack = ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("torch", "triton") and v)
        rows.append([f"`{path.name}`", f"`{p.get('command', '?')}`", where, p.get("date", "?")[:10],
                     p.get("device", "?"), stack])  # fmt: skip
    return table(["file", "command", "commit", "date", "device", "versions"], rows, "llllll")


def headline() -> str:
    """The README's performance summary: one line per claim, each from its file."""
    k, s = load("kernels_h100.json"), load("spec_decode_h100.json")
    kv = k["kv_write"]
    decode = {(r["cache"], r["batch"], r["context"]): r for r in k["decode"]}
    big = [(b, c) for (cache, b, c) in decode if cache == "bfloat16" and b >= 64]
    bf16_peak = [decode[("bfloat16", b, c)]["gbs"] / k["nominal_peak_gbs"] for b, c in big]
    fp8_ratio = [decode[("bfloat16", b, c)]["us"] / decode[("float8_e4m3fn", b, c)]["us"] for b, c in big]
    spec = {(r["batch"], r["k"]): r for r in s["rows"]}
    b1 = spec[(1, 4)]
    rows = [
        ["fused KV write vs cast-then-scatter, 1 to 32,768 tokens",
         f"{x(min(r['speedup'] for r in kv))}–{x(max(r['speedup'] for r in kv))} faster", "`kernels_h100.json`"],
        ["decode attention, bf16 pages, batch ≥ 64, contexts 512–32,768",
         f"{pct(min(bf16_peak))}–{pct(max(bf16_peak))} of HBM peak", "`kernels_h100.json`"],
        ["decode attention, fp8 vs bf16 pages, same shapes",
         f"{x(min(fp8_ratio))}–{x(max(fp8_ratio))} faster", "`kernels_h100.json`"],
        ["speculative decoding, demo pair, greedy, batch 1, k = 4",
         f"{x(b1['speedup'])} end to end ({x(b1['decode_speedup'])} in decode), mean acceptance length "
         f"{b1['mean_acceptance_length']:.2f}", "`spec_decode_h100.json`"],
    ]  # fmt: skip
    return table(["H100, torch 2.11, triton 3.6", "result", "file"], rows, "lll")


def meta(data: dict) -> dict:
    """A result's provenance, wherever the file keeps it: under "provenance" (benchmarks/provenance.py), in
    "env", in a "versions" dict, or as top-level fields (throughput.py, serve.py)."""
    nested = data.get("provenance", {})
    flat = {**data, **data.get("env", {})}
    for versions in (data.get("versions"), nested.get("versions")):
        if isinstance(versions, dict):
            flat.update(versions)
    flat.update({k: v for k, v in nested.items() if k != "versions"})
    return {
        **{k: flat.get(k) for k in ("commit", "dirty", "date", "command", "recorded_in")},
        "versions": {k: flat[k] for k in ("python", "torch", "triton") if flat.get(k)},
        "device": flat.get("device") or flat.get("gpu"),
    }


BLOCKS = {
    ROOT / "README.md": {"throughput": render_throughput, "headline": headline},
    RESULTS / "README.md": {
        "provenance": provenance,
        "throughput-why": render_throughput_why,
        "throughput-details": render_throughput_details,
        "gpu-correctness": gpu_correctness,
        "kv-write": kv_write,
        "decode-attention": decode_attention,
        "spec-decode": spec_decode,
        "spec-decode-variants": spec_decode_variants,
        "profile-spec": profile_spec,
        "profile-prefill": profile_prefill,
    },
}


def render(text: str, blocks: dict) -> str:
    for name, fn in blocks.items():
        pattern = re.compile(rf"(<!-- render:{name} -->\n).*?(<!-- /render:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"missing block <!-- render:{name} --> ... <!-- /render:{name} -->")
        body = fn()
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for path, blocks in BLOCKS.items():
        text = path.read_text()
        new = render(text, blocks)
        if new != text:
            stale.append(path)
            if not check:
                path.write_text(new)
    if check and stale:
        print("stale (run python scripts/render_results.py):", ", ".join(str(p) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
