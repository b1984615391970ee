"""GPU checks of the whole engine on the demo pair (run on an NVIDIA/AMD GPU; results under $OUT).

    python benchmarks/gpu_engine_check.py

1. Greedy generation with the Triton attention backend equals the torch reference backend (fp32 and bf16,
   bf16 and fp8 KV caches).
2. Speculative decoding is lossless: greedy outputs with the demo draft equal those without it, for a batch of
   mixed prompt lengths, k in {1, 2, 4, 6}, bf16 and fp8 KV caches.
3. CUDA-graph replays give the same greedy outputs as eager passes.
4. The seed's failure cannot happen: with an fp8 KV cache, a speculative run whose every KV write goes through
   the fused Triton kernel and one whose writes go through the torch reference produce identical draft and
   target KV bytes, identical outputs and identical acceptance counts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

import miniserve.models.llama as llama_module  # noqa: E402
from miniserve import LLM, SamplingParams  # noqa: E402
from miniserve.config import DEMO_DRAFT, DEMO_TARGET  # noqa: E402
from miniserve.kernels import reshape_and_cache  # noqa: E402

PROMPTS = [
    "ROMEO:",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "JULIET:\nO",
    "KING HENRY VI:\nWhat, will the aspiring blood of Lancaster\nSink in the ground? I thought it would have mounted.",
    "HAMLET:\nTo be, or not to be",
    "MENENIUS:\nWhat work's, my countrymen, in hand?",
]
GREEDY = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)


def outputs(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Identical sequences, and where they first diverge (prefix length) when they don't."""
    first = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), len(s)) for s, t in zip(a, b)]
    return {
        "identical": a == b,
        "identical_sequences": sum(s == t for s, t in zip(a, b)),
        "of": len(a),
        "first_divergence": first,
    }


def check_backends() -> dict:
    res = {}
    for dtype in ("float32", "bfloat16"):
        for kv in ("auto", "fp8"):
            tri = outputs(LLM(str(DEMO_TARGET), dtype=dtype, kv_cache_dtype=kv, attention_backend="triton"))
            ref = outputs(LLM(str(DEMO_TARGET), dtype=dtype, kv_cache_dtype=kv, attention_backend="torch"))
            res[f"{dtype}/kv={kv}"] = agreement(tri, ref)
    return res


def check_lossless() -> dict:
    res = {}
    for kv in ("auto", "fp8"):
        plain = outputs(LLM(str(DEMO_TARGET), kv_cache_dtype=kv))
        for k in (1, 2, 4, 6):
            llm = LLM(
                str(DEMO_TARGET),
                kv_cache_dtype=kv,
                speculative_model=str(DEMO_DRAFT),
                num_speculative_tokens=k,
            )
            spec = outputs(llm)
            s = llm.engine.stats()
            res[f"bf16/kv={kv}/k={k}"] = {
                **agreement(spec, plain),
                "mean_acceptance_length": 1 + s["spec_num_accepted_tokens"] / s["spec_num_drafts"],
            }
    return res


def check_graphs_vs_eager() -> dict:
    """CUDA-graph replays (the default) against eager passes, plain and speculative, bf16 and fp8 KV."""
    res = {}
    for kv in ("auto", "fp8"):
        for spec in ({}, {"speculative_model": str(DEMO_DRAFT), "num_speculative_tokens": 4}):
            graphs = outputs(LLM(str(DEMO_TARGET), kv_cache_dtype=kv, **spec))
            eager = outputs(LLM(str(DEMO_TARGET), kv_cache_dtype=kv, enforce_eager=True, **spec))
            res[f"kv={kv}/{'spec' if spec else 'plain'}"] = agreement(graphs, eager)
    return res


def spec_run(write_impl: str) -> tuple[LLM, list[list[int]]]:
    def write(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale):
        reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, impl=write_impl)

    original = llama_module.reshape_and_cache
    llama_module.reshape_and_cache = write
    try:  # eager: the torch reference write uses boolean indexing, which a CUDA graph cannot capture
        llm = LLM(
            str(DEMO_TARGET),
            kv_cache_dtype="fp8",
            speculative_model=str(DEMO_DRAFT),
            num_speculative_tokens=4,
            enforce_eager=True,
        )
        return llm, outputs(llm)
    finally:
        llama_module.reshape_and_cache = original


def check_fused_vs_reference_writes() -> dict:
    fused, out_f = spec_run("triton")
    ref, out_r = spec_run("reference")
    sf, sr = fused.engine.stats(), ref.engine.stats()
    return {
        "draft_kv_bytes_equal": torch.equal(
            fused.engine.draft.kv_pool.view(torch.uint8), ref.engine.draft.kv_pool.view(torch.uint8)
        ),
        "target_kv_bytes_equal": torch.equal(
            fused.engine.target.kv_pool.view(torch.uint8), ref.engine.target.kv_pool.view(torch.uint8)
        ),
        "outputs_identical": out_f == out_r,
        "acceptance_identical": (sf["spec_num_accepted_tokens"], sf["spec_accepted_per_position"])
        == (sr["spec_num_accepted_tokens"], sr["spec_accepted_per_position"]),
        "mean_acceptance_length_fused": 1 + sf["spec_num_accepted_tokens"] / sf["spec_num_drafts"],
        "mean_acceptance_length_reference": 1 + sr["spec_num_accepted_tokens"] / sr["spec_num_drafts"],
    }


def main() -> None:
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "python benchmarks/gpu_engine_check.py",
    }
    result = {
        "env": env,
        "graphs_vs_eager": check_graphs_vs_eager(),
        "backends": check_backends(),
        "lossless": check_lossless(),
        "fused_vs_reference_writes": check_fused_vs_reference_writes(),
    }
    Path(os.environ.get("OUT", "."), "engine_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
