"""GPU checks of the whole engine on the demo pair (run on an NVIDIA/AMD GPU; results under $OUT).

    python benchmarks/gpu_engine_check.py [--only CHECK ...] [--out FILE]

1. Greedy generation with the Triton attention backend equals the torch reference backend (fp32 and bf16,
   bf16 and fp8 KV caches), both on cuBLAS projections (dependent_launch="off"); and how often greedy outputs
   with dependent launches and the Triton GEMM (the default on Hopper) agree with that (not bit-identical:
   the GEMMs round differently in the last bits).
2. Speculative decoding is lossless: greedy outputs with the demo draft equal those without it, for a batch of
   mixed prompt lengths, k in {1, 2, 4, 6}, bf16 and fp8 KV caches.
3. CUDA-graph replays give the same outputs as eager passes (greedy, and seeded sampling with speculation).
5. The fused layer ops (RMSNorm + residual, RoPE, SiLU-and-mul) on the GPU against their torch references:
   rotary and the residual sum bit for bit, the rest within 2 ulp.
4. The seed's failure cannot happen: with an fp8 KV cache, a speculative run whose every KV write goes through
   the fused Triton kernel and one whose writes go through the torch reference produce identical draft and
   target KV bytes, identical outputs and identical acceptance counts.
6. Structured outputs on the GPU (needs xgrammar): seeded constrained samples parse as JSON with the schema's
   fields, and are the same whether xgrammar fills the masks on one thread or on four (every fill on the threads).
7. Grammar masks read by the sampling kernel: constrained greedy decoding gives the torch path's tokens, and
   unseeded constrained samples (the kernel's race) parse.
8. Logprobs as vLLM's Logprob objects: the sampled token first with its rank, the top N ranked 1..N; CUDA-graph
   replays equal eager passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

import miniserve.models.llama as llama_module  # noqa: E402
from benchmarks.provenance import write_result  # noqa: E402
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


def outputs(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


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
            kw = dict(dtype=dtype, kv_cache_dtype=kv)
            tri = outputs(LLM(str(DEMO_TARGET), **kw, attention_backend="triton", dependent_launch="off"))
            ref = outputs(LLM(str(DEMO_TARGET), **kw, attention_backend="torch"))
            res[f"{dtype}/kv={kv}"] = agreement(tri, ref)
    return res


def check_dependent_launch() -> dict:
    """Greedy outputs with dependent launches (and the Triton GEMM at decode rows) against ordinary launches."""
    res = {}
    for kv in ("auto", "fp8"):
        dependent = outputs(LLM(str(DEMO_TARGET), kv_cache_dtype=kv))
        ordinary = outputs(LLM(str(DEMO_TARGET), kv_cache_dtype=kv, dependent_launch="off"))
        res[f"bf16/kv={kv}"] = agreement(dependent, ordinary)
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


def ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| in units of the dtype's epsilon relative to |want| (0 when equal)."""
    eps = torch.finfo(want.dtype).eps
    diff = (got.float() - want.float()).abs()
    return (diff / (want.float().abs() * eps).clamp_min(torch.finfo(want.dtype).tiny)).max().item()


def check_layer_ops() -> dict:
    from miniserve.kernels import layer_ops as ops
    from miniserve.models.config import ModelConfig
    from miniserve.models.llama import Rotary

    g = torch.Generator(device="cuda").manual_seed(0)
    res = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        T, hq, hk, d, hidden, inter = 257, 32, 8, 128, 4096, 11008
        qkv = torch.randn(T, (hq + 2 * hk) * d, device="cuda", generator=g).to(dtype)
        positions = torch.randint(0, 4096, (T,), device="cuda", generator=g)
        cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": hq * d,
                                     "num_attention_heads": hq, "num_key_value_heads": hk,
                                     "intermediate_size": inter, "num_hidden_layers": 1, "vocab_size": 8,
                                     "max_position_embeddings": 4096})  # fmt: skip
        rot = Rotary(cfg, 4096).cuda()
        one = torch.ones(1, device="cuda")
        tri, ref = qkv.clone(), qkv.clone()
        for t, impl in ((tri, "triton"), (ref, "torch")):
            q, k = t[:, : hq * d].view(T, hq, d), t[:, hq * d : (hq + hk) * d].view(T, hk, d)
            cache = torch.zeros(T, 1, hk, d, dtype=dtype, device="cuda")  # RoPE runs inside the KV write
            reshape_and_cache(k, torch.zeros_like(k), cache, cache.clone(), torch.arange(T, device="cuda"),
                              one, one, impl, ops.Rope(q, positions, rot.cos, rot.sin))  # fmt: skip
        x, r = torch.randn(2, T, hidden, device="cuda", generator=g).to(dtype)
        w = torch.randn(hidden, device="cuda", generator=g).to(dtype)
        (n_t, s_t), (n_r, s_r) = (ops.rms_norm(x, w, 1e-5, r, backend=i) for i in ("triton", "torch"))
        gu = torch.randn(T, 2 * inter, device="cuda", generator=g).to(dtype)
        a_t, a_r = (ops.silu_and_mul(gu, backend=i) for i in ("triton", "torch"))
        res[str(dtype)[6:]] = {
            "rotary_bit_exact": torch.equal(tri, ref),
            "residual_sum_bit_exact": torch.equal(s_t, s_r),
            "rms_norm_max_ulp": ulps(n_t, n_r),
            "silu_and_mul_max_ulp": ulps(a_t, a_r),
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
    # sampled speculative rounds replay the draft's and the target's captured passes; same seeds, same tokens
    sampled = SamplingParams(temperature=0.8, seed=0, max_tokens=96, ignore_eos=True)
    spec = {"speculative_model": str(DEMO_DRAFT), "num_speculative_tokens": 4}
    graphs = outputs(LLM(str(DEMO_TARGET), **spec), sampled)
    eager = outputs(LLM(str(DEMO_TARGET), enforce_eager=True, **spec), sampled)
    res["kv=auto/spec-sampled"] = agreement(graphs, eager)
    return res


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


def check_structured_outputs() -> dict:
    """Seeded JSON-schema sampling on the GPU: valid, and identical whether the masks are filled on one thread or
    on four, with the sampling batch's other host work on a helper thread beside the fill (the default on a GPU) or
    all on the engine's thread, and with overlapped steps or stepwise (async_scheduling=False)."""
    import miniserve.engine.structured_output as structured_output
    from miniserve.sampling_params import StructuredOutputsParams

    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=120, n=2, structured_outputs=spec)
    runs, threshold = {}, structured_output.THREADS_FROM_MS
    structured_output.THREADS_FROM_MS = 0.0  # every single-thread fill counts as costly: the rest use the threads
    variants = {"threads1": (1, True, True), "threads4": (4, True, True), "foreground": (4, False, True)}
    variants["stepwise"] = (4, True, False)
    try:
        for name, (threads, background, overlap) in variants.items():
            llm = LLM(str(DEMO_TARGET), grammar_threads=threads, async_scheduling=overlap)
            llm.engine.decoder.masks.beside = background
            runs[name] = [c.text for o in llm.generate(PROMPTS, params, use_tqdm=False) for c in o.outputs]
    finally:
        structured_output.THREADS_FROM_MS = threshold

    texts = [t for run in runs.values() for t in run]
    return {
        "valid": sum(json_valid(t) for t in texts),
        "of": len(texts),
        "threads_1_equals_4": runs["threads1"] == runs["threads4"],
        "background_equals_foreground": runs["threads4"] == runs["foreground"],
        "overlapped_equals_stepwise": runs["threads4"] == runs["stepwise"],
        "sample": runs["threads4"][0],
    }


def json_valid(text: str) -> bool:
    """The text is an object of SCHEMA's fields and types."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    types = {"name": str, "age": int, "ok": bool}
    return isinstance(value, dict) and set(value) == set(types) and all(type(value[k]) is t for k, t in types.items())


def check_kernel_masks() -> dict:
    """Grammar masks read by the sampling kernel (engine/sampler.py: the race and the masked argmax): constrained
    greedy decoding gives the torch path's tokens, and unseeded sampling (the race, masks and all) valid JSON."""
    import miniserve.engine.sampler as sampler_module
    from miniserve.sampling_params import StructuredOutputsParams

    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    llm = LLM(str(DEMO_TARGET))
    greedy = SamplingParams(temperature=0.0, max_tokens=120, structured_outputs=spec)
    kernel = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    fused = sampler_module._fused
    sampler_module._fused = lambda logits: False  # the torch path: unpack the bits, mask, argmax
    try:
        torch_path = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    finally:
        sampler_module._fused = fused
    drawn = SamplingParams(temperature=1.0, max_tokens=120, n=4, structured_outputs=spec)
    texts = [c.text for o in llm.generate(PROMPTS, drawn, use_tqdm=False) for c in o.outputs]
    return {
        "greedy_kernel_equals_torch": kernel == torch_path,
        "greedy_valid": sum(json_valid(llm.get_tokenizer().decode(t, skip_special_tokens=True)) for t in kernel),
        "greedy_of": len(kernel),
        "unseeded_valid": sum(json_valid(t) for t in texts),
        "unseeded_of": len(texts),
        "sample": texts[0],
    }


def spec_run(write_impl: str) -> tuple[LLM, list[list[int]]]:
    def write(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, backend="auto", rope=None, pdl=False):
        reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, write_impl, rope, pdl)

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
    ref, out_r = spec_run("torch")
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


def check_logprobs() -> dict:
    """vLLM's Logprob objects from the GPU's sampler (seeded samples at temperature 1, top 3): each position's
    dict holds the sampled token first, then the top 3 ranked 1..3 in descending order; the sampled token's rank
    is its top rank when among them, else above 3; CUDA-graph replays give the eager passes' tokens, logprobs and
    ranks; a speculative run (its own draws) keeps the same shape."""
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=48, logprobs=3, ignore_eos=True)
    spec = {"speculative_model": str(DEMO_DRAFT), "num_speculative_tokens": 4}
    res, seen = {}, {}
    for name, kw in (("graphs", {}), ("eager", {"enforce_eager": True}), ("spec", spec)):
        outs = LLM(str(DEMO_TARGET), **kw).generate(PROMPTS, params, use_tqdm=False)
        entries = [(t, e) for o in outs for t, e in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
        shaped = 0
        for token, entry in entries:
            keys = list(entry)
            in_top = len(keys) == 3  # else the sampled token was added before the top 3
            top = keys if in_top else keys[1:]
            by_rank = sorted(top, key=lambda k: entry[k].rank)
            ranks_ok = [entry[k].rank for k in by_rank] == [1, 2, 3] and all(
                entry[a].logprob >= entry[b].logprob for a, b in zip(by_rank, by_rank[1:])
            )
            sampled_ok = keys[0] == token and (entry[token].rank <= 3) == in_top
            shaped += ranks_ok and sampled_ok
        res[name] = {
            "positions": len(entries),
            "shaped_as_vllm": shaped,
            "sampled_outside_top3": sum(e[t].rank > 3 for t, e in entries),
        }
        seen[name] = [(t, [(k, v.logprob, v.rank) for k, v in e.items()]) for t, e in entries]
    res["graphs_equal_eager"] = seen["graphs"] == seen["eager"]
    return res


# penalties and a bad word: the sampler reads each sequence's token history every step (Sequence.token_array)
PENALIZED = SamplingParams(
    temperature=0, max_tokens=96, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.4,
    presence_penalty=0.3, bad_words=["the"],
)  # fmt: skip


def check_penalties() -> dict:
    """Penalized greedy decoding: overlapped steps replaying CUDA graphs (the default) against plain eager steps,
    and speculative decoding (k=4) against both, each sequence's history read every step."""
    default = outputs(LLM(str(DEMO_TARGET)), PENALIZED)
    eager = outputs(LLM(str(DEMO_TARGET), async_scheduling=False, enforce_eager=True), PENALIZED)
    spec = outputs(LLM(str(DEMO_TARGET), speculative_model=str(DEMO_DRAFT), num_speculative_tokens=4), PENALIZED)
    return {"default_vs_plain_eager": agreement(default, eager), "speculative_vs_default": agreement(spec, default)}


CHECKS = {
    "layer_ops": check_layer_ops,
    "graphs_vs_eager": check_graphs_vs_eager,
    "backends": check_backends,
    "dependent_launch": check_dependent_launch,
    "lossless": check_lossless,
    "fused_vs_reference_writes": check_fused_vs_reference_writes,
    "structured_outputs": check_structured_outputs,
    "kernel_masks": check_kernel_masks,
    "logprobs": check_logprobs,
    "penalties": check_penalties,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run these checks alone (default: every one)")
    ap.add_argument("--out", default=None, help="the JSON file (default: $OUT/engine_check.json)")
    args = ap.parse_args()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    result = {"env": env, **{name: CHECKS[name]() for name in args.only or CHECKS}}
    write_result(args.out or Path(os.environ.get("OUT", "."), "engine_check.json"), result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
