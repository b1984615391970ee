"""Speculative decoding on the CPU: lossless greedy output, an unbiased sampler, exact KV rollback."""

from __future__ import annotations

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


def test_sampled_tokens_with_speculation_match_target_distribution(llama_dir, draft_dir):
    """End to end: the 2nd generated token (the first one that speculation produces) has the target's law."""
    prompt = [5, 9, 13, 2]
    temp = 0.6
    base = LLM(str(llama_dir), dtype="float32", device="cpu")
    # exact marginal of token 2: sum_t1 P(t1) P(t2 | t1), with P from the target at this temperature
    worker = base.engine.target
    from miniserve.engine.model_runner import ForwardInput

    logits1 = worker.forward([ForwardInput(prompt, 0, [0], 1)])[0]
    p1 = torch.softmax(logits1 / temp, -1)
    support = p1.argsort(descending=True)[:12]
    p1s = p1[support] / p1[support].sum()
    marg = torch.zeros(VOCAB)
    for t1, w in zip(support.tolist(), p1s.tolist()):
        logits2 = worker.forward([ForwardInput(prompt + [t1], 0, [1], 1)])[0]
        marg += w * torch.softmax(logits2 / temp, -1)
    n = 1500
    spec = LLM(
        str(llama_dir),
        dtype="float32",
        device="cpu",
        speculative_model=str(draft_dir),
        num_speculative_tokens=3,
        max_num_seqs=512,
    )
    params = [SamplingParams(temperature=temp, max_tokens=2, seed=i, ignore_eos=True) for i in range(n)]
    outs = spec.generate([prompt] * n, params, use_tqdm=False)
    pairs = [o.outputs[0].token_ids for o in outs]
    kept = [b for a, b in pairs if a in set(support.tolist())]
    freq = torch.bincount(torch.tensor(kept), minlength=VOCAB).float() / len(kept)
    top = marg.argsort(descending=True)[:5]
    assert (freq[top] - marg[top]).abs().max() < 0.06
    assert spec.engine.stats()["spec_num_drafts"] > 0


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
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
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


def test_logprobs_with_speculation_equal_plain_logprobs(llama_dir, draft_dir):
    prompts = mixed_prompts(5)[1:3]
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=2, ignore_eos=True)
    plain = LLM(str(llama_dir), dtype="float32", device="cpu").generate(prompts, params, use_tqdm=False)
    spec_llm = LLM(
        str(llama_dir), dtype="float32", device="cpu", speculative_model=str(draft_dir), num_speculative_tokens=3
    )
    spec = spec_llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)


def test_sampled_self_speculation_accepts_everything(llama_dir):
    """Draft == target: in a sampled round q equals p at every position, so every draft passes u * q < p. Any
    slip in the draft's positions, tokens or cache makes q differ from p and rejects some."""
    prompts = mixed_prompts(8)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=30, ignore_eos=True)
    _, eng = run(llama_dir, prompts, params, speculative_model=str(llama_dir), num_speculative_tokens=4)
    s = eng.stats()
    assert s["spec_num_drafts"] > 20 and s["spec_num_accepted_tokens"] == s["spec_num_draft_tokens"]
