"""Speculative decoding on the CPU: lossless greedy output, an unbiased sampler, exact KV rollback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from miniserve import LLM, SamplingParams
from miniserve.engine.sampler import SamplingBatch, sample_from_probs
from miniserve.spec_decode.rejection import rejection_sample
from tests.conftest import VOCAB


def mixed_prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (1, 7, 23, 14, 40)]


def run(path, prompts, params, **kw):
    llm = LLM(str(path), dtype="float32", device="cpu", **kw)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.engine


@pytest.mark.parametrize("kv", ["auto", "fp8"])
@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_greedy_output_is_identical_with_speculation(llama_dir, draft_dir, k, kv):
    prompts = mixed_prompts()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain, _ = run(llama_dir, prompts, params, kv_cache_dtype=kv)
    spec, eng = run(
        llama_dir,
        prompts,
        params,
        kv_cache_dtype=kv,
        speculative_model=str(draft_dir),
        num_speculative_tokens=k,
    )
    assert spec == plain
    stats = eng.stats()
    assert stats["spec_num_drafts"] > 0 and stats["spec_num_draft_tokens"] == k * stats["spec_num_drafts"]
    assert eng.block_manager.num_used_blocks == 0


def test_draft_pool_has_its_own_shape_and_kv_dtype(llama_dir, draft_dir):
    """speculative_kv_cache_dtype: an fp8 draft pool beside a float32 target pool, each shaped by its own model
    (layers, KV heads, head size); greedy output is still the target's own."""
    prompts = mixed_prompts(2)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain, _ = run(llama_dir, prompts, params)
    spec, eng = run(llama_dir, prompts, params, speculative_model=str(draft_dir), speculative_kv_cache_dtype="fp8")
    assert spec == plain
    for worker in eng.workers:
        cfg = worker.model_config
        assert worker.kv_pool.shape[:2] == (cfg.num_layers, 2)
        assert worker.kv_pool.shape[-2:] == (cfg.num_kv_heads, cfg.head_dim)
    assert (eng.target.kv_pool.dtype, eng.draft.kv_pool.dtype) == (torch.float32, torch.float8_e4m3fn)
    assert eng.target.model_config.num_layers != eng.draft.model_config.num_layers
    assert eng.stats()["spec_num_drafts"] > 0  # the draft pool was used


def test_demo_switch_enables_the_demo_pair():
    """speculative_model="demo" with no model: the shipped target and draft, speculation lossless on them."""
    from miniserve.config import DEMO_DRAFT, DEMO_TARGET

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(device="cpu").generate(["ROMEO:"], params, use_tqdm=False)[0].outputs[0].token_ids
    llm = LLM(speculative_model="demo", num_speculative_tokens=3, device="cpu")
    assert (llm.engine.target.model_dir, llm.engine.draft.model_dir) == (str(DEMO_TARGET), str(DEMO_DRAFT))
    assert llm.generate(["ROMEO:"], params, use_tqdm=False)[0].outputs[0].token_ids == plain
    s = llm.engine.stats()
    assert s["spec_num_accepted_tokens"] / s["spec_num_draft_tokens"] > 0.3  # a trained pair really agrees


def test_vllm_speculative_config_names_the_draft(llama_dir, draft_dir):
    """vLLM's LLM(speculative_config={...}): the same engine as speculative_model / num_speculative_tokens."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    spec = {"model": str(draft_dir), "num_speculative_tokens": 2, "method": "draft_model"}
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", speculative_config=spec)
    config = llm.engine.config
    assert (config.speculative_model, config.num_speculative_tokens) == (str(draft_dir), 2)
    plain = LLM(str(llama_dir), device="cpu", dtype="float32").generate(["To be"], params, use_tqdm=False)
    assert llm.generate(["To be"], params, use_tqdm=False)[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert llm.engine.stats()["spec_num_drafts"] > 0
    for bad, message in (
        ({**spec, "method": "ngram"}, "method 'ngram' is not supported"),
        ({**spec, "quantization": "fp8"}, "'quantization' is not supported"),
        ({"num_speculative_tokens": 2}, "needs the draft's 'model'"),
        ({**spec, "draft_tensor_parallel_size": 2}, "draft_tensor_parallel_size=1"),
    ):
        with pytest.raises(ValueError, match=message):
            LLM(str(llama_dir), device="cpu", speculative_config=bad)
    with pytest.raises(ValueError, match="num_speculative_tokens is given twice"):
        LLM(str(llama_dir), device="cpu", speculative_config=spec, num_speculative_tokens=3)


def test_vllm_speculative_config_flag_and_variable(draft_dir):
    """`miniserve serve --speculative-config JSON` (vLLM's flag) or MINISERVE_SPECULATIVE_CONFIG: the draft settings
    as if given one by one; the draft's other settings then do something; a bad value names the setting."""
    from miniserve import cli
    from miniserve.config import DEMO_DRAFT, EngineConfig, SettingError
    from miniserve.settings import from_sources

    spec = json.dumps({"model": str(draft_dir), "num_speculative_tokens": 2})
    argv = ["serve", "--speculative-config", spec, "--speculative-kv-cache-dtype", "fp8", "--no-overlap-spec-rounds"]
    config = from_sources(EngineConfig, cli.build_parser().parse_args(argv), env={})
    assert (config.speculative_model, config.num_speculative_tokens) == (str(draft_dir), 2)
    assert (config.speculative_kv_cache_dtype, config.overlap_spec_rounds) == ("fp8", False)
    config = from_sources(EngineConfig, env={"MINISERVE_SPECULATIVE_CONFIG": '{"model": "demo"}'})
    assert (config.speculative_model, config.num_speculative_tokens) == (str(DEMO_DRAFT), 4)  # (k's default)
    for env, says in (
        ({"MINISERVE_SPECULATIVE_CONFIG": '{"method": "ngram", "model": "x"}'}, "method 'ngram' is not supported"),
        ({"MINISERVE_SPECULATIVE_CONFIG": '["demo"]'}, "speculative_config must be a JSON object"),
        ({"MINISERVE_SPECULATIVE_CONFIG": '{"model": "demo", "num_speculative_tokens": "2"}'}, "an integer, got"),
        ({"MINISERVE_SPECULATIVE_CONFIG": '{"model": "demo"}', "MINISERVE_SPECULATIVE_MODEL": "demo"}, "give one"),
    ):
        with pytest.raises(SettingError, match=says) as exc:
            from_sources(EngineConfig, env=env)
        assert str(exc.value).startswith("MINISERVE_SPECULATIVE_"), exc.value
    with pytest.raises(SettingError, match="--speculative-kv-cache-dtype: does nothing without --speculative-model"):
        from_sources(EngineConfig, cli.build_parser().parse_args(argv[:1] + argv[3:]), env={})


def test_self_speculation_accepts_everything(llama_dir):
    """Draft == target: every proposal is accepted, so each round emits k+1 tokens."""
    prompts = mixed_prompts(1)
    params = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    plain, _ = run(llama_dir, prompts, params)
    spec, eng = run(llama_dir, prompts, params, speculative_model=str(llama_dir), num_speculative_tokens=4)
    assert spec == plain
    s = eng.stats()
    assert s["spec_num_accepted_tokens"] == s["spec_num_draft_tokens"]
    assert s["spec_accepted_per_position"] == [s["spec_num_drafts"]] * 4


@pytest.mark.parametrize("overlap", [False, True])
def test_self_speculation_accepts_everything_across_block_ends(llama_dir, overlap):
    """Draft == target, so a draft step that read less of its context than the target would propose another token:
    every proposal is accepted only if each draft step attends over its whole context, also where the round's
    last draft steps pass the end of the block that holds its first position (a prompt of 14, blocks of 16)."""
    prompt = mixed_prompts(2)[2][:14]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(speculative_model=str(llama_dir), num_speculative_tokens=4, overlap_spec_rounds=overlap)
    _, eng = run(llama_dir, [prompt], params, block_size=16, **kw)
    s = eng.stats()
    assert s["spec_num_drafts"] > 0 and s["spec_num_accepted_tokens"] == s["spec_num_draft_tokens"]


@pytest.mark.parametrize("overlap", [False, True])
def test_each_round_counts_the_tokens_the_target_computes(llama_dir, draft_dir, overlap):
    """The iteration_tokens histogram's count: a prompt's tokens once, then k + 1 a round for each sequence (its
    token before the drafts and the k drafts), however many the round accepts."""
    k, prompts = 3, mixed_prompts(2)
    llm = LLM(str(llama_dir), dtype="float32", device="cpu", speculative_model=str(draft_dir),
              num_speculative_tokens=k, overlap_spec_rounds=overlap)  # fmt: skip
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    computed = 0
    while engine.has_unfinished_requests():
        engine.step()
        computed += engine.last_step_num_tokens
    rounds = engine.stats()["spec_num_drafts"]  # one per sequence and round
    assert rounds > 0 and computed == sum(map(len, prompts)) + (k + 1) * rounds


def test_seeded_sampling_with_speculation_is_the_same_under_preemption(llama_dir, draft_dir):
    """A request's seed fixes its output whatever else runs: with speculation, a sequence recomputed after a
    preemption goes on with a speculative round, as it would have without the preemption (a round draws from the
    seed in its own order; sampling the next token at the end of the recompute drew differently)."""
    prompts = mixed_prompts(3)
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=30, ignore_eos=True) for i in range(len(prompts))]
    spec = dict(speculative_model=str(draft_dir), num_speculative_tokens=3, block_size=8)
    alone = [run(llama_dir, [p], [sp], **spec)[0][0] for p, sp in zip(prompts, params)]
    together, eng = run(llama_dir, prompts, params, num_kv_blocks=14, **spec)
    assert eng.scheduler.num_preemptions > 0 and eng.stats()["spec_num_drafts"] > 0
    assert together == alone


def test_seeded_sampling_with_speculation_is_the_same_in_any_prompt_chunks(llama_dir, draft_dir):
    """A prompt cut into chunks by the token budget gets its first token sampled at its end, as a whole prompt
    does, also when its last chunk is a single token (that chunk is not a decode step: a speculative round there
    drew from the seed in another order). 23 tokens in chunks of 11 or 22 end with a one-token chunk; 12 ends
    with 1 token to spare."""
    prompt = mixed_prompts(4)[2]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=12, ignore_eos=True) for s in range(4)]
    spec = dict(speculative_model=str(draft_dir), num_speculative_tokens=3, block_size=8, max_num_seqs=1)
    whole, _ = run(llama_dir, [prompt] * len(params), params, **spec)
    for budget in (11, 12, 22):
        chunked, eng = run(llama_dir, [prompt] * len(params), params, max_num_batched_tokens=budget, **spec)
        assert eng.stats()["spec_num_drafts"] > 0
        assert chunked == whole, budget


def test_speculation_with_preemption_stops_and_max_tokens(llama_dir, draft_dir):
    prompts = mixed_prompts(2)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain, _ = run(llama_dir, prompts, params)
    spec, eng = run(
        llama_dir,
        prompts,
        params,
        speculative_model=str(llama_dir),
        num_speculative_tokens=3,
        num_kv_blocks=14,
        block_size=8,
    )
    assert spec == plain and eng.scheduler.num_preemptions > 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    # max_tokens and a stop token landing in the middle of an accepted run cut it exactly there
    cut = plain[2][9]
    p2 = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[cut], ignore_eos=True)
    spec2, _ = run(llama_dir, [prompts[2]], p2, speculative_model=str(llama_dir), num_speculative_tokens=4)
    assert spec2[0] == plain[2][: plain[2].index(cut) + 1]
    spec3, _ = run(
        llama_dir,
        [prompts[2]],
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
        speculative_model=str(llama_dir),
        num_speculative_tokens=4,
    )
    assert spec3[0] == plain[2][:7]


def test_rejection_sampler_output_follows_target_distribution():
    """Many independent rows: the emitted first token must be distributed as p, whatever q is."""
    torch.manual_seed(0)
    V, k, rows = 6, 3, 40000
    p = torch.softmax(torch.randn(k + 1, V) * 1.5, -1)
    q = torch.softmax(torch.randn(k, V) * 1.5, -1)
    P, Q = p.expand(rows, k + 1, V), q.expand(rows, k, V)
    drafts = torch.multinomial(q.repeat(rows, 1), 1).view(rows, k)
    batch = SamplingBatch.build([_random_params()] * rows, [None] * rows, [[1]] * rows, [[]] * rows, set(), V, "cpu")
    accepted, nxt = rejection_sample(P, Q, drafts, torch.rand(rows, k), lambda r: sample_from_probs(r, batch))
    first = torch.where(accepted > 0, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=V).float() / rows
    assert (freq - p[0]).abs().max() < 0.012  # ~5 sigma for 40k draws
    # acceptance rate of the first draft equals sum(min(p, q)) (the theory's overlap)
    assert abs((accepted > 0).float().mean() - torch.minimum(p[0], q[0]).sum()) < 0.012
    # a biased sampler (accept every draft) would emit q instead, and the test above would catch it
    assert (q[0] - p[0]).abs().max() > 0.05


def _random_params():
    return SamplingParams(temperature=1.0)


SPEC_SAMPLES = 3000  # the power against a SHIFT is asserted below
ALPHA = 1e-3  # family-wise significance level: a correct sampler fails this (seeded) test with probability 0.1%
SHIFT = 0.05  # a change of any one token's probability by this much must be detected with power >= 0.99


def binomial_tails(n: int, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P(X <= x) and P(X >= x) for X ~ Binomial(n, p_i), every x in 0..n: [len(p), n + 1] each, exact (fp64)."""
    x = torch.arange(n + 1, dtype=torch.float64)
    p = p.double().clamp(1e-300, 1 - 1e-16)[:, None]
    log_pmf = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
    pmf = (log_pmf + x * p.log() + (n - x) * torch.log1p(-p)).exp()
    return pmf.cumsum(-1).clamp(max=1), pmf.flip(-1).cumsum(-1).flip(-1).clamp(max=1)


def sharper_copy(src, dst, factor: float):
    """The target with its logits multiplied by `factor`: a draft close to the target (most drafts accepted) whose
    distribution still differs from it, so that both the acceptance test and the residual resample matter."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * factor
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_sampled_tokens_with_speculation_match_target_distribution(llama_dir, tmp_path):
    """End to end: the 2nd generated token (the first one a speculative round produces, an accepted draft or a
    residual resample) follows the target's law: its exact marginal sum_t1 P(t1) P(t2 | t1), from transformers.

    Two tests at ALPHA / 2 each: Pearson's chi-square over the tokens expected at least 10 times (the rest pooled),
    for diffuse distortions, and an exact two-sided binomial test of every token (Bonferroni over the vocabulary),
    whose power against a SHIFT of any one token's probability is computed here. Mutants of the rejection rule
    it failed on when written: acceptance biased by +30% (u * q < 1.3 p: chi-square 161 on 61 df) or by -20%
    (124), resampling from p instead of the residual (320); a +10% bias (below SHIFT) passes. About 8 s."""
    import transformers

    prompt, temp, n = [5, 9, 13, 2], 0.4, SPEC_SAMPLES
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        p1 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1].double() / temp, -1)
        both = torch.cat([torch.tensor(prompt).repeat(VOCAB, 1), torch.arange(VOCAB)[:, None]], dim=1)
        marginal = p1 @ torch.softmax(hf(both).logits[:, -1].double() / temp, -1)

    draft = sharper_copy(llama_dir, tmp_path / "draft", 2.0)
    spec = LLM(str(llama_dir), dtype="float32", device="cpu", seed=0, max_num_seqs=512,
               speculative_model=str(draft), num_speculative_tokens=2)  # fmt: skip
    params = SamplingParams(temperature=temp, max_tokens=2, ignore_eos=True)
    outs = spec.generate([prompt] * n, params, use_tqdm=False)
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[1] for o in outs]), minlength=VOCAB).double()
    accepted_first = spec.engine.stats()["spec_accepted_per_position"][0]
    assert 0.3 * n < accepted_first < 0.9 * n  # both paths taken often: accepted drafts and residual resamples

    expected = n * marginal
    big = expected >= 10
    observed_bins = torch.cat([counts[big], counts[~big].sum()[None]])
    expected_bins = torch.cat([expected[big], expected[~big].sum()[None]])
    chi2 = ((observed_bins - expected_bins) ** 2 / expected_bins).sum()
    df = torch.tensor(len(observed_bins) - 1.0, dtype=torch.float64)
    p_chi2 = torch.special.gammaincc(df / 2, chi2 / 2).item()

    level = ALPHA / 2 / VOCAB / 2  # per token and tail
    lower, upper = binomial_tails(n, marginal)
    rows, x = torch.arange(VOCAB), counts.long()
    p_token = torch.minimum(lower[rows, x], upper[rows, x]).min().item()
    first_rejected = (upper > level).sum(-1).clamp(max=n)  # counts from here on reject
    power = binomial_tails(n, (marginal + SHIFT).clamp(max=1))[1][rows, first_rejected].min().item()
    assert power >= 0.99, f"{n} samples detect a {SHIFT} shift of one token with power {power:.3f} only"
    assert p_chi2 > ALPHA / 2, f"chi-square {chi2:.1f} on {int(df)} df: p = {p_chi2:.2e}"
    assert p_token > level, f"a token's count is off: two-sided tail {p_token:.2e} < {level:.2e}"


@pytest.mark.parametrize("field", [{"top_k": 1}, {"top_p": 1e-6}])
def test_filters_keep_their_meaning_in_sampled_rounds(llama_dir, draft_dir, field):
    """top_k=1 and a tiny top_p leave only the target's argmax: sampled speculative rounds (filters applied to
    both the draft's and the target's distributions) must then reproduce plain greedy decoding."""
    prompts = mixed_prompts(3)
    greedy, _ = run(llama_dir, prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True, **field)
    spec, eng = run(llama_dir, prompts, params, speculative_model=str(draft_dir), num_speculative_tokens=3)
    assert spec == greedy
    assert eng.stats()["spec_num_drafts"] > 0


def test_speculation_on_triton_kernels_is_lossless(llama_dir, draft_dir):
    """The device-side draft/verify inputs drive the Triton decode and extend kernels (interpreter on CPU)."""
    prompts = mixed_prompts(3)[:3]
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)  # rounds of 4, the second cut short
    kw = dict(kv_cache_dtype="fp8", attention_backend="triton", block_size=8)
    plain, _ = run(llama_dir, prompts, params, **kw)
    spec, eng = run(llama_dir, prompts, params, speculative_model=str(draft_dir), num_speculative_tokens=3, **kw)
    assert spec == plain and eng.draft.backend == "triton"


def test_greedy_with_penalties_and_min_tokens_is_lossless(llama_dir, draft_dir):
    """Penalised greedy rows go through the general round (processed distributions, rejection sampling on
    one-hot rows): still exactly the plain output."""
    prompts = mixed_prompts(4)[:3]
    params = SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=5)
    plain, _ = run(llama_dir, prompts, params)
    spec, eng = run(llama_dir, prompts, params, speculative_model=str(draft_dir), num_speculative_tokens=3)
    assert spec == plain and eng.stats()["spec_num_drafts"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logprobs_with_speculation_equal_plain_logprobs(llama_dir, draft_dir, dtype):
    """bfloat16: a greedy round keeps its logits in the model dtype; their logprobs are still computed in float32."""
    prompts = mixed_prompts(5)[1:3]
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=2, ignore_eos=True)
    plain = LLM(str(llama_dir), dtype=dtype, device="cpu").generate(prompts, params, use_tqdm=False)
    spec_llm = LLM(
        str(llama_dir), dtype=dtype, device="cpu", speculative_model=str(draft_dir), num_speculative_tokens=3
    )
    spec = spec_llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert list(x) == list(y) and all(abs(x[t] - y[t]) < 1e-4 for t in x)
            assert [(v.rank, v.decoded_token) for v in x.values()] == [(v.rank, v.decoded_token) for v in y.values()]


def test_sampled_self_speculation_accepts_everything(llama_dir):
    """Draft == target: in a sampled round q equals p at every position, so every draft passes u * q < p. Any
    slip in the draft's positions, tokens or cache makes q differ from p and rejects some."""
    prompts = mixed_prompts(8)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=30, ignore_eos=True)
    _, eng = run(llama_dir, prompts, params, speculative_model=str(llama_dir), num_speculative_tokens=4)
    s = eng.stats()
    assert s["spec_num_drafts"] > 20 and s["spec_num_accepted_tokens"] == s["spec_num_draft_tokens"]
