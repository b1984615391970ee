"""Engine behaviour on the CPU: FP8 KV cache, preemption, chunked prefill, sampling, stops and bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import miniserve.models.llama as llama_module
from miniserve import LLM, SamplingParams
from miniserve.engine.model_runner import ForwardInput
from tests.conftest import VOCAB
from tests.fp8_oracle import quantize_bytes_tensor

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def make_llm(path, **kw) -> LLM:
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", "cpu")
    return LLM(str(path), **kw)


def token_prompts(n: int, seed: int = 0, lo: int = 2, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def greedy_ids(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


# ------------------------------------------------------------------ FP8 KV cache


def test_fp8_cache_bytes_equal_reference_quantization(llama_dir, monkeypatch):
    """Every K/V the model writes lands in the cache as exactly the quantization of that K/V (the independent
    oracle of tests/fp8_oracle.py)."""
    llm = make_llm(llama_dir, kv_cache_dtype="fp8")
    worker = llm.engine.target
    assert worker.kv_dtype == torch.float8_e4m3fn
    writes = []
    original = llama_module.reshape_and_cache

    def recording(
        key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, backend="auto", rope=None, pdl=False
    ):
        original(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, backend, rope, pdl)
        # after the call: the key as rotated on the way (`rope`), which is what the cache must hold
        writes.append((key.clone(), value.clone(), key_cache, value_cache, slot_mapping.clone(), k_scale, v_scale))

    monkeypatch.setattr(llama_module, "reshape_and_cache", recording)
    prompt = token_prompts(1, seed=5, lo=30, hi=31)[0]
    worker.forward([ForwardInput(prompt, 0, [0, 1], 1)])
    worker.forward([ForwardInput([7], len(prompt), [0, 1], 1)])
    assert len(writes) == 2 * worker.model_config.num_layers
    for key, value, kc, vc, slots, ks, vs in writes:
        for x, cache, scale in ((key, kc, ks), (value, vc, vs)):
            stored = cache.view(-1, *cache.shape[2:])[slots].view(torch.uint8)
            assert torch.equal(stored, quantize_bytes_tensor(x, scale, torch.float8_e4m3fn))


# Measured on these random weights (5 prompts): ||fp8 - fp32|| / ||fp32|| of the logits = 0.057..0.086 and
# top-1 agreement 0.80..1.00. e4m3 keeps 3 mantissa bits (up to 6.25% relative error per K/V element), and
# these weights are 7x larger than a normal init, so this is close to the worst case; trained models do better.
FP8_REL_TOL = 0.15


def test_fp8_logits_stay_close_to_full_precision(llama_dir):
    prompt = token_prompts(1, seed=9, lo=30, hi=31)[0]
    full = make_llm(llama_dir).engine.target
    fp8 = make_llm(llama_dir, kv_cache_dtype="fp8").engine.target
    a = full.forward([ForwardInput(prompt, 0, [0, 1], len(prompt))])
    b = fp8.forward([ForwardInput(prompt, 0, [0, 1], len(prompt))])
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel <= FP8_REL_TOL  # nonzero: the cache really is quantized
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


# ------------------------------------------------------------------ scheduling


def test_preemption_keeps_greedy_output_and_returns_every_block(llama_dir):
    prompts = token_prompts(6, seed=2, lo=10, hi=30)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    big = greedy_ids(make_llm(llama_dir), prompts, params)
    small = make_llm(llama_dir, num_kv_blocks=10, block_size=8)  # 80 slots for 6 sequences of up to 70 tokens
    got = greedy_ids(small, prompts, params)
    assert got == big
    eng = small.engine
    assert eng.scheduler.num_preemptions > 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert all(c == 0 for c in eng.block_manager.ref_counts)


def test_chunked_prefill_and_seq_limit_keep_output(llama_dir):
    prompts = token_prompts(5, seed=3, lo=20, hi=60)
    expected = greedy_ids(make_llm(llama_dir), prompts)
    chunked = make_llm(llama_dir, max_num_batched_tokens=16, max_num_seqs=2)
    assert greedy_ids(chunked, prompts) == expected


def test_prompt_tokens_count_once_the_prompt_pass_is_done(llama_dir):
    """stats()["prompt_tokens_total"] (vLLM's prompt_tokens counter): a request's prompt counts when its first
    token comes (for each of n choices, as vLLM's n child requests count theirs), not when it is queued; one aborted
    before that never counts."""
    llm = make_llm(llama_dir, max_num_batched_tokens=16, enable_prefix_caching=False)
    eng = llm.engine
    eng.add_request("a", list(range(2, 42)), SamplingParams(n=2, temperature=1.0, max_tokens=2, ignore_eos=True))
    eng.add_request("gone", list(range(2, 12)), GREEDY)
    eng.abort_request("gone")
    counts = []
    while eng.has_unfinished_requests():
        outs = eng.step()
        counts.append((eng.stats()["prompt_tokens_total"], any(o.outputs[0].token_ids for o in outs)))
    first = next(i for i, (_, has_token) in enumerate(counts) if has_token)
    assert first >= 2  # 40 tokens in chunks of 16: three steps, the last one sampling
    assert [c for c, _ in counts][:first] == [0] * first
    assert counts[first][0] in (40, 80) and counts[-1][0] == 80  # each choice's 40, when its first token comes


def test_mixed_steps_in_any_order_keep_the_outputs(llama_dir):
    """Prompt chunks beside running decodes, listed in whatever order (the scheduler's list reversed here: its own
    order has the decodes first): ModelRunner.prepare packs them as listed and hands each its logits rows, so the
    outputs stay those of the unchunked engine."""
    prompts = token_prompts(5, seed=3, lo=20, hi=60)
    expected = greedy_ids(make_llm(llama_dir), prompts)
    llm = make_llm(llama_dir, max_num_batched_tokens=24, max_num_seqs=4)
    schedule = llm.engine.scheduler.schedule
    llm.engine.scheduler.schedule = lambda: schedule()[::-1]
    prepare, listed = llm.engine.target.prepare, []

    def recorded(inputs):
        listed.append([len(x.token_ids) for x in inputs])
        return prepare(inputs)

    llm.engine.target.prepare = recorded
    assert greedy_ids(llm, prompts) == expected
    assert any(b[0] != 1 and 1 in b for b in listed)  # some step listed a prompt chunk before a decode


def test_the_triton_backend_runs_mixed_batches_whole_and_verification_as_decode_queries():
    """ModelRunner._for_kernels on the Triton backend: a few tokens per sequence become one decode query per token
    (speculative verification gets plain decoding's arithmetic), a batch with a prompt chunk runs whole on the
    extend kernel, and the torch backend takes the batch as it is."""
    from types import SimpleNamespace

    import numpy as np

    from miniserve.engine.model_runner import ModelRunner
    from miniserve.kernels.metadata import AttentionMetadata

    def meta(counts, seq_lens):
        return AttentionMetadata(
            torch.zeros(sum(counts), dtype=torch.int64), torch.tensor([0, *np.cumsum(counts)], dtype=torch.int32),
            torch.tensor(seq_lens, dtype=torch.int32), torch.zeros(len(counts), 4, dtype=torch.int32), max(counts),
            max(seq_lens),
        )  # fmt: skip

    def run(backend, counts, seq_lens):
        given = meta(counts, seq_lens)
        return given, ModelRunner._for_kernels(SimpleNamespace(backend=backend), given)

    given, got = run("triton", [1, 1, 1, 40, 1, 17], [90, 300, 5, 40, 70, 60])
    assert got is given
    assert run("triton", [1, 3, 2], [9, 8, 7])[1].query_start_loc.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert run("triton", [16, 16], [20, 30])[1].max_query_len == 1  # the longest verification: k = 15
    assert run("triton", [1, 17], [20, 30])[1].max_query_len == 17
    given, got = run("torch", [1, 3, 2], [9, 8, 7])
    assert got is given


def test_n_choices_share_prompt_blocks(llama_dir):
    llm = make_llm(llama_dir, block_size=4)
    prompt = token_prompts(1, seed=4, lo=21, hi=22)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    eng = llm.engine
    eng.add_request("r", prompt, params)
    peak_shared = 0
    outs = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            outs = out
        peak_shared = max(peak_shared, sum(1 for c in eng.block_manager.ref_counts if c > 1))
    assert peak_shared == (len(prompt) - 1) // 4  # full prompt blocks held once for all three choices
    assert [c.index for c in outs.outputs] == [0, 1, 2]
    alone = [
        llm.generate(
            [prompt],
            SamplingParams(temperature=1.0, seed=11 + i, max_tokens=12, ignore_eos=True),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
        for i in range(3)
    ]
    assert [c.token_ids for c in outs.outputs] == alone
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


# ------------------------------------------------------------------ sampling


def test_seeded_requests_reproduce_regardless_of_batch(llama_dir):
    llm = make_llm(llama_dir)
    prompt = token_prompts(1, seed=6)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = token_prompts(4, seed=7)
    mixed = llm.generate(
        others[:2] + [prompt] + others[2:],
        [SamplingParams(temperature=1.0, max_tokens=20)] * 2
        + [params]
        + [SamplingParams(temperature=0.7, max_tokens=5)] * 2,
        use_tqdm=False,
    )
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = llm.generate(
        [prompt],
        SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True),
        use_tqdm=False,
    )
    assert other_seed[0].outputs[0].token_ids != alone


@pytest.mark.parametrize("field, value", [("top_k", 3), ("top_p", 0.3), ("min_p", 0.3)])
def test_filters_never_emit_excluded_tokens(llama_dir, field, value):
    """Every sampled token is inside the filter's allowed set, recomputed from the model's own logits."""
    llm = make_llm(llama_dir)
    prompt = token_prompts(1, seed=8)[0]
    params = SamplingParams(temperature=1.5, max_tokens=1, n=64, seed=3, **{field: value})
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    worker = make_llm(llama_dir).engine.target
    logits = worker.forward([ForwardInput(prompt, 0, [0, 1, 2], 1)])[0]
    probs = torch.softmax(logits / 1.5, -1)
    order = probs.argsort(descending=True)
    if field == "top_k":
        allowed = set(order[:value].tolist())
    elif field == "top_p":
        cum = probs[order].cumsum(0)
        allowed = set(order[: int((cum < value).sum()) + 1].tolist())
    else:
        allowed = set((probs >= value * probs.max()).nonzero().flatten().tolist())
    sampled = {c.token_ids[0] for c in out.outputs}
    assert sampled <= allowed
    assert len(sampled) >= min(2, len(allowed))


def test_stop_strings_cut_text_and_set_finish_reason(llama_dir):
    llm = make_llm(llama_dir)
    prompt = token_prompts(1, seed=10)[0]
    free = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]
    kept = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == free.text[: free.text.index(stop)] + stop
    assert free.finish_reason == "length"


def test_stop_token_ids_eos_and_min_tokens(llama_dir):
    llm = make_llm(llama_dir)
    prompt = token_prompts(1, seed=12)[0]
    free = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    target = free[5]
    first = free.index(target)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[target]), use_tqdm=False)[
        0
    ].outputs[0]
    assert out.token_ids == free[: first + 1] and out.finish_reason == "stop" and out.stop_reason == target
    held = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[target], min_tokens=first + 2),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(held.token_ids) > first + 1 and target not in held.token_ids[: first + 2]


def test_logprobs_are_top_n_of_the_raw_distribution(llama_dir):
    """Top-N of log_softmax; N is bounded by max_logprobs (20 by default, as vLLM's), and -1 asks for the whole
    vocabulary where max_logprobs=-1 allows it."""
    llm = make_llm(llama_dir, max_logprobs=-1)
    prompt = token_prompts(1, seed=13)[0]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=4, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    every = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=-1), use_tqdm=False)
    default = make_llm(llama_dir)
    for n in (21, -1):
        with pytest.raises(ValueError, match="logprobs: .* top logprobs per token, more than max_logprobs=20"):
            default.generate([prompt], SamplingParams(max_tokens=1, logprobs=n), use_tqdm=False)
    assert (
        len(
            default.generate([prompt], SamplingParams(max_tokens=1, logprobs=20), use_tqdm=False)[0]
            .outputs[0]
            .logprobs[0]
        )
        >= 20
    )
    worker = default.engine.target
    logits = worker.forward([ForwardInput(prompt, 0, [0, 1, 2], 1)])[0]
    ref = torch.log_softmax(logits, -1)
    top = ref.topk(4)
    first = out.logprobs[0]
    assert set(first) == set(top.indices.tolist())
    for tid, lp in first.items():
        assert abs(lp - ref[tid].item()) < 1e-4
    assert len(out.logprobs) == 3
    assert abs(out.cumulative_logprob - sum(d[t] for d, t in zip(out.logprobs, out.token_ids))) < 1e-4
    whole = every[0].outputs[0].logprobs[0]
    assert sorted(whole) == list(range(ref.numel()))
    assert max(abs(lp - ref[tid].item()) for tid, lp in whole.items()) < 1e-4


def assert_vllm_logprobs(entry: dict, chosen: int, ref: torch.Tensor, num_top: int, tok) -> None:
    """vLLM's Logprob dict for one position, against `ref` (transformers' log_softmax there): the chosen token
    first with its rank (tokens at least as likely), then the top `num_top` in order, ranked 1..num_top (the
    chosen one keeps its top rank when among them); each `.logprob` the float itself, `.decoded_token` the token
    decoded alone."""
    top = ref.topk(num_top).indices.tolist()
    assert list(entry) == [chosen] + [t for t in top if t != chosen]
    rank = top.index(chosen) + 1 if chosen in top else int((ref >= ref[chosen]).sum())
    assert entry[chosen].rank == rank and [entry[t].rank for t in top] == list(range(1, num_top + 1))
    for t, lp in entry.items():
        assert lp.logprob == float(lp) and abs(lp.logprob - ref[t].item()) < 1e-4
        assert lp.decoded_token == tok.decode([t])


def test_logprobs_are_vllms_logprob_objects_with_ranks(llama_dir):
    """Sampled tokens (temperature 1: some fall outside the top 2) get vLLM's Logprob objects; the oracle is
    transformers' distribution at each generated position (the output fed back whole)."""
    import pickle

    import transformers

    llm = make_llm(llama_dir)
    prompt = token_prompts(1, seed=21, lo=8, hi=9)[0]
    params = SamplingParams(temperature=1.0, max_tokens=12, logprobs=2, seed=3, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0], -1)
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    for j, (entry, token) in enumerate(zip(out.logprobs, out.token_ids)):
        assert_vllm_logprobs(entry, token, ref[len(prompt) - 1 + j], 2, tok)
    assert any(entry[t].rank > 2 for entry, t in zip(out.logprobs, out.token_ids)), "no rank outside the top"
    again = pickle.loads(pickle.dumps(out.logprobs))
    assert [[(v.logprob, v.rank, v.decoded_token) for v in e.values()] for e in again] == [
        [(v.logprob, v.rank, v.decoded_token) for v in e.values()] for e in out.logprobs
    ]
    undecoded = SamplingParams(temperature=0, max_tokens=2, logprobs=1, detokenize=False)
    entry = llm.generate([prompt], undecoded, use_tqdm=False)[0].outputs[0].logprobs[0]
    assert all(v.decoded_token is None and v.rank == 1 for v in entry.values())


# ------------------------------------------------------------------ bad input


def test_bad_input_is_a_clear_error_and_engine_stays_usable(llama_dir):
    llm = make_llm(llama_dir, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 80], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="multi_modal_data: multimodal inputs are not supported"):
        llm.generate({"prompt": "x", "multi_modal_data": {"image": object()}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="a prompt dict has no key 'prompt_ids'"):
        llm.generate({"prompt_ids": [5]}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="'prompt_token_ids' must be a list of token ids"):
        llm.generate({"prompt_token_ids": 5}, GREEDY, use_tqdm=False)
    for unordered_or_bytes in (b"To be", {5, 6}, [bytearray(b"ab")]):  # bytes iterate as ints; sets have no order
        with pytest.raises(ValueError, match="must be a string"):
            llm.generate(unordered_or_bytes, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="'prompt_token_ids' must be a list of token ids, got set"):
        llm.generate({"prompt_token_ids": {5, 6}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[VOCAB + 5]], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_used_blocks == 0
    out = llm.generate(["To be, or not"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5


def test_llm_engine_takes_vllms_prompt_forms_and_aborts_lists(llama_dir):
    """LLMEngine.add_request takes the prompt dicts LLM.generate takes (vLLM's TextPrompt / TokensPrompt, with a
    cache_salt); abort_request takes a list of ids (vLLM's V1 form). The oracle is LLM.generate on the same prompts;
    LLM's request ids are vLLM's ("0", "1", ...)."""
    import transformers

    llm = make_llm(llama_dir)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = llm.generate(["To be", [5, 6, 7]], params, use_tqdm=False)
    assert [o.request_id for o in want] == ["0", "1"]
    eng = llm.engine
    eng.add_request("a", {"prompt": "To be", "cache_salt": "s"}, params)
    eng.add_request("b", {"prompt_token_ids": [5, 6, 7], "prompt": "text"}, params)
    eng.add_request("c", {"prompt": "To be"}, params)
    eng.add_request("d", [5, 6, 7], params)
    eng.abort_request(["c", "d"])
    done = {o.request_id: o for _ in range(20) for o in eng.step() if o.finished}
    assert sorted(done) == ["a", "b"] and not eng.has_unfinished_requests()
    assert done["a"].outputs[0].token_ids == want[0].outputs[0].token_ids and done["a"].prompt == "To be"
    assert done["b"].outputs[0].token_ids == want[1].outputs[0].token_ids and done["b"].prompt == "text"
    assert eng.block_manager.num_used_blocks == 0
    # a chat template's ids as transformers 5 returns them (a dict): the error says what to take
    encoded = transformers.AutoTokenizer.from_pretrained(llama_dir)("To be")
    for prompt in ({"prompt_token_ids": encoded}, dict(encoded)):
        with pytest.raises(ValueError, match="apply_chat_template returns a dict of input_ids"):
            eng.add_request("e", prompt, params)
    assert llm.reset_prefix_cache() is True


def test_llm_keywords_are_settings_vllm_no_ops_or_refused_by_name(llama_dir):
    """A vLLM keyword that changes nothing here is taken with a warning; one that asks for what this engine does
    not do, or no setting at all, is refused by name; a setting given where another makes it do nothing is refused
    as the CLI refuses it (it used to build an engine that ignored it)."""
    with pytest.warns(UserWarning, match="trust_remote_code=True is taken but changes nothing"):
        make_llm(llama_dir, trust_remote_code=True, swap_space=4)
    # None (vLLM's unset) and a setting at its default are not given: nothing to warn about or refuse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_llm(llama_dir, speculative_model=None, num_speculative_tokens=None, overlap_spec_rounds=True,
                 distributed_executor_backend=None, enable_chunked_prefill=None, trust_remote_code=False,
                 pipeline_parallel_size=1, disable_log_stats=True)  # fmt: skip
    # a value that asks for something this engine does anyway is taken, and said so
    with pytest.warns(UserWarning, match="enable_chunked_prefill=False is taken but changes nothing: prompts are"):
        make_llm(llama_dir, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 is not supported"):
        make_llm(llama_dir, pipeline_parallel_size=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_num_seq'.*did you mean 'max_num_seqs'"):
        make_llm(llama_dir, max_num_seq=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tokenizer_mode': not a miniserve setting"):
        make_llm(llama_dir, tokenizer_mode="auto")
    with pytest.raises(ValueError, match="num_speculative_tokens=3: does nothing without speculative_model"):
        make_llm(llama_dir, num_speculative_tokens=3)
    with pytest.raises(ValueError, match="overlap_spec_rounds=False: does nothing without speculative_model"):
        make_llm(llama_dir, overlap_spec_rounds=False)
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.5: does nothing with num_kv_blocks"):
        make_llm(llama_dir, gpu_memory_utilization=0.5, num_kv_blocks=64)
    with pytest.raises(TypeError):  # speculative_config is a keyword (vLLM's second positional is the tokenizer)
        LLM(str(llama_dir), {"model": str(llama_dir)})


def test_request_that_can_never_fit_is_rejected(llama_dir):
    """A pool of 16 slots: a 10-token prompt fits 7 new tokens at most (the last is never fed back), and the error
    says so, naming max_tokens; a prompt of 17 never fits."""
    llm = make_llm(llama_dir, num_kv_blocks=2, block_size=8)
    for max_tokens in (8, 20, None):
        with pytest.raises(ValueError, match="^max_tokens: .* holds 16; at most 7 new tokens fit beside this prompt"):
            llm.generate([[5] * 10], SamplingParams(max_tokens=max_tokens), use_tqdm=False)
    exact = SamplingParams(max_tokens=7, ignore_eos=True)
    assert len(llm.generate([[5] * 10], exact, use_tqdm=False)[0].outputs[0].token_ids) == 7
    with pytest.raises(ValueError, match="^this request may need 17 tokens .*; it can never fit"):
        llm.generate([[5] * 17], SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(llm.generate([[5] * 4], SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids) >= 1


def test_vllm_prompt_dicts_keep_their_text_and_cache_salt(llama_dir):
    llm = make_llm(llama_dir, block_size=4)
    ids = llm.get_tokenizer().encode("To be, or not to be, that is the question")
    out = llm.generate({"prompt_token_ids": ids, "prompt": "the text"}, GREEDY, use_tqdm=False)[0]
    assert out.prompt == "the text" and out.prompt_token_ids == ids
    llm.reset_prefix_cache()
    cached = [
        llm.generate({"prompt_token_ids": ids, "cache_salt": salt}, GREEDY, use_tqdm=False)[0].num_cached_tokens
        for salt in ("a", "a", "b")
    ]
    assert cached[0] == 0 and cached[1] >= 8 and cached[2] == 0  # a salt reads only its own cached blocks


def test_chat_gives_templates_tool_call_arguments_as_objects(llama_dir):
    """OpenAI messages carry tool-call arguments as JSON text; templates read objects (`arguments | tojson`), as
    transformers is given them by vLLM; empty text is no arguments."""
    import transformers

    template = (
        "{% for m in messages %}{{ m.role }}:{% for c in m.tool_calls or [] %}{{ c.function.name }}"
        "{{ c.function.arguments | tojson }};{% endfor %}{{ m.content or '' }}\n{% endfor %}"
    )

    def conversation(*arguments: object) -> list[dict]:
        calls = [
            {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": a}}
            for i, a in enumerate(arguments)
        ]
        return [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
        ]

    llm = make_llm(llama_dir)
    out = llm.chat(conversation('{"city": "Paris"}', "", None), GREEDY, use_tqdm=False, chat_template=template)[0]
    hf = transformers.AutoTokenizer.from_pretrained(llama_dir)
    expected = hf.apply_chat_template(
        conversation({"city": "Paris"}, {}, {}), chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert out.prompt == expected and '"city": "Paris"' in expected
    with pytest.raises(ValueError, match=r"messages\[1\]: tool call arguments must be JSON text, got '\{bad'"):
        llm.chat(conversation("{bad", "{}"), GREEDY, use_tqdm=False, chat_template=template)


def test_priority_scheduling_starts_the_most_urgent_first_and_keeps_each_output(llama_dir):
    """One sequence at a time, priorities 2, 0, 1: they start 1, 2, 0, each with the tokens it has alone. Under
    fcfs a priority other than 0 is refused, as in vLLM."""
    prompts, params = token_prompts(3, seed=21), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm = make_llm(llama_dir, scheduling_policy="priority", max_num_seqs=1)
    outs = llm.generate(prompts, params, use_tqdm=False, priority=[2, 0, 1])
    assert sorted(range(3), key=lambda i: outs[i].metrics["first_scheduled_time"]) == [1, 2, 0]
    fcfs = make_llm(llama_dir)
    assert [o.outputs[0].token_ids for o in outs] == greedy_ids(fcfs, prompts, params)
    with pytest.raises(ValueError, match="priority: 1 needs scheduling_policy 'priority'"):
        fcfs.generate(prompts[:1], params, use_tqdm=False, priority=[1])
    with pytest.raises(ValueError, match="priority has 2 values for 3 prompts"):
        llm.generate(prompts, params, use_tqdm=False, priority=[0, 1])
    with pytest.raises(TypeError, match="priority must be a list of ints, one per prompt, got int"):
        llm.generate(prompts, params, use_tqdm=False, priority=0)
    assert not llm.engine.has_unfinished_requests()


def test_chat_template_content_format_setting_reaches_llm_chat_and_the_server(llama_dir):
    """The setting (and LLM.chat's own argument over it): a template looping over the content parts iterates the
    text's characters when given text ("string"), the one part when auto detects what it reads."""
    from miniserve.config import EngineConfig
    from miniserve.server.state import load_tokenizer

    loops = "{% for m in messages %}<|{{ m.role }}|>{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endfor %}"
    llm = make_llm(llama_dir, chat_template=loops, chat_template_content_format="string")
    chat, params = [{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=1)
    assert llm.chat(chat, params, use_tqdm=False)[0].prompt == "<|user|>[][]"
    assert llm.chat(chat, params, use_tqdm=False, chat_template_content_format="auto")[0].prompt == "<|user|>[Hi]"
    config = EngineConfig(model=str(llama_dir), chat_template_content_format="openai")
    assert load_tokenizer(config).content_format == "openai"


def test_generate_beside_a_request_added_to_the_engine_returns_its_own_outputs(llama_dir):
    """A request added through LLMEngine.add_request that finishes during LLM.generate is not counted as one of
    generate's: each call returns its own outputs (as when run alone) and leaves nothing running."""
    llm = make_llm(llama_dir)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    alone = llm.generate("To be", params, use_tqdm=False)[0].outputs[0].token_ids
    for _ in range(2):  # (a call that stopped early used to leave its request running, failing the next call too)
        llm.engine.add_request("other", [5, 6, 7], SamplingParams(temperature=0, max_tokens=1))
        beside = llm.generate("To be", params, use_tqdm=False)[0]
        assert beside.finished and beside.outputs[0].token_ids == alone
        assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.num_used_blocks == 0


def test_sampling_values_vllm_gives_a_meaning(llama_dir):
    assert SamplingParams(seed=-1).seed is None  # vLLM's "no seed"
    assert SamplingParams(logprobs=True).logprobs == 1 and SamplingParams(prompt_logprobs=True).prompt_logprobs == 1
    assert SamplingParams(logprobs=-1).logprobs == -1  # the whole vocabulary (the engine bounds it: max_logprobs)
    with pytest.raises(ValueError, match="repetition_penalty must be in \\[1e-06"):
        SamplingParams(repetition_penalty=1e-308)  # 0 in float32: the penalty would divide by zero
    llm = make_llm(llama_dir, max_model_len=32)
    # truncate_prompt_tokens=-1: as many of the prompt's last tokens as leave room to generate one
    prompt = list(range(5, 45))
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=-1), use_tqdm=False)
    assert out[0].prompt_token_ids == prompt[-31:] and len(out[0].outputs[0].token_ids) == 1
    assert out[0].outputs[0].finish_reason == "length"
    # at most the context: 32 keeps a short prompt whole, 33 is refused (as vLLM refuses it)
    out = llm.generate([prompt[:5]], SamplingParams(max_tokens=1, truncate_prompt_tokens=32), use_tqdm=False)
    assert out[0].prompt_token_ids == prompt[:5]
    with pytest.raises(ValueError, match=r"^truncate_prompt_tokens: 33 is more than .* \(max_model_len\) 32"):
        llm.generate([prompt[:5]], SamplingParams(max_tokens=1, truncate_prompt_tokens=33), use_tqdm=False)


def test_engine_seed_none_draws_a_fresh_seed(llama_dir):
    from miniserve.config import EngineConfig, SettingError

    sampled = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    runs = [make_llm(llama_dir, seed=seed).generate(["To be"], sampled, use_tqdm=False) for seed in (None, None, 3, 3)]
    tokens = [r[0].outputs[0].token_ids for r in runs]
    assert tokens[0] != tokens[1] and tokens[2] == tokens[3]
    with pytest.raises(SettingError, match="seed must be an integer or None, got '3'"):
        EngineConfig(seed="3")


def test_chat_and_string_prompts(llama_dir):
    import transformers

    llm = make_llm(llama_dir)
    tok = llm.get_tokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(llama_dir)
    messages = [{"role": "user", "content": "Speak, friend."}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    # vLLM's: the output's prompt is the rendered chat
    assert out.prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert out.prompt_token_ids.count(tok.bos_token_id) == 1
    # the recipe written for a transformers tokenizer: its ids, generated from as the chat's are
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    again = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == out.outputs[0].token_ids and again.prompt is None
    text_out = llm.generate("ROMEO:", GREEDY, use_tqdm=False)[0]
    assert text_out.prompt == "ROMEO:" and text_out.prompt_token_ids == tok.encode("ROMEO:")
    assert text_out.outputs[0].text == tok.decode(text_out.outputs[0].token_ids, skip_special_tokens=True)


def test_prompts_and_params_in_every_shape_and_clear_errors_for_the_rest(llama_dir):
    """Token ids as numpy or torch integers are token ids; a wrong type of prompts, params or messages is a
    ValueError that names the argument (not a TypeError from deep inside); use_tqdm may be a tqdm-like class."""
    import numpy as np

    llm = make_llm(llama_dir)
    ids = [5, 9, 13]
    want = llm.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    for same in (np.array(ids), torch.tensor(ids), [np.int64(t) for t in ids], {"prompt_token_ids": np.array(ids)}):
        out = llm.generate(same, GREEDY, use_tqdm=False)
        assert len(out) == 1 and out[0].prompt_token_ids == ids and out[0].outputs[0].token_ids == want
    assert [o.outputs[0].token_ids for o in llm.generate(np.array([ids, ids]), GREEDY, use_tqdm=False)] == [want] * 2
    for bad, name in ((None, "prompts"), (123, "prompts"), ([1.5, 2.5], "prompt"), ([[1.5]], "token")):
        with pytest.raises(ValueError, match=name):
            llm.generate(bad, GREEDY, use_tqdm=False)
    for bad in ({"max_tokens": 3}, [{"max_tokens": 3}], "greedy"):
        with pytest.raises(ValueError, match="sampling_params must be a SamplingParams"):
            llm.generate("a", bad, use_tqdm=False)
    for bad in ("hello", [{"role": "user", "content": "a"}, "b"], None):
        with pytest.raises(ValueError, match="messages must be"):
            llm.chat(bad, GREEDY, use_tqdm=False)
    bars = []

    class Bar:
        def __init__(self, total, desc, disable):
            bars.append(total)

        def update(self, n):
            bars.append(n)

        def close(self):
            bars.append("closed")

    llm.generate(["a", "b"], GREEDY, use_tqdm=Bar)
    assert bars == [2, 1, 1, "closed"]

    def no_disable(total, desc):  # a bar that cannot start: the call fails with nothing left in the engine
        return Bar(total, desc, False)

    with pytest.raises(TypeError, match="disable"):
        llm.generate(["a", "b"], GREEDY, use_tqdm=no_disable)
    assert not llm.engine.has_unfinished_requests()


def test_truncate_prompt_tokens_keeps_a_text_prompts_bos_as_transformers_left_truncation(llama_dir):
    import transformers

    left = transformers.AutoTokenizer.from_pretrained(llama_dir, truncation_side="left")
    llm = make_llm(llama_dir)
    text = "the quick brown fox jumps over the lazy dog " * 3
    full = left(text).input_ids
    for keep in (1, 2, 5, len(full) - 1, len(full), len(full) + 1):
        out = llm.generate(text, SamplingParams(max_tokens=1, truncate_prompt_tokens=keep), use_tqdm=False)[0]
        assert out.prompt_token_ids == left(text, truncation=True, max_length=keep).input_ids, keep
    out = llm.generate([full], SamplingParams(max_tokens=1, truncate_prompt_tokens=5), use_tqdm=False)[0]
    assert out.prompt_token_ids == full[-5:]  # token ids: their last ones


def test_generation_config_sets_the_default_sampling_params(llama_dir, tmp_path):
    """vLLM's generation_config="auto": LLM.generate without sampling params samples with generation_config.json's
    settings (top_k 1: greedy; max_new_tokens: max_tokens); "vllm" ignores them; a bad value names the file."""
    import shutil

    from miniserve.config import EngineConfig, SettingError

    tuned = shutil.copytree(llama_dir, tmp_path / "tuned")
    (tuned / "generation_config.json").write_text(json.dumps({"top_k": 1, "temperature": 0.7, "max_new_tokens": 5}))
    prompts = [[5, 9, 13], [7, 7, 2, 30]]
    greedy = make_llm(llama_dir).generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    llm = make_llm(tuned)
    assert llm.get_default_sampling_params() == SamplingParams(top_k=1, temperature=0.7, max_tokens=5)
    for out, want in zip(llm.generate(prompts, use_tqdm=False), greedy):
        assert out.outputs[0].token_ids == want.outputs[0].token_ids[: len(out.outputs[0].token_ids)]
        assert len(out.outputs[0].token_ids) == 5 or out.outputs[0].finish_reason == "stop"
    assert make_llm(tuned, generation_config="vllm").get_default_sampling_params() == SamplingParams()
    # vLLM's override_generation_config: its keys over the file's (auto), or alone (vllm); a dict or JSON
    override = {"temperature": 0.3, "max_new_tokens": 2}
    llm = make_llm(tuned, override_generation_config=override)
    assert llm.get_default_sampling_params() == SamplingParams(top_k=1, temperature=0.3, max_tokens=2)
    assert [len(o.outputs[0].token_ids) for o in llm.generate(prompts, use_tqdm=False)] == [2, 2]
    alone = make_llm(tuned, generation_config="vllm", override_generation_config=json.dumps(override))
    assert alone.get_default_sampling_params() == SamplingParams(temperature=0.3, max_tokens=2)
    for bad, says in (({"temprature": 0.3}, "override_generation_config: unknown key 'temprature'"),
                      ({"top_p": 1.5}, "override_generation_config: top_p")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            make_llm(tuned, override_generation_config=bad)
    for bad in ("[1]", "{temperature: 1}", "0.5"):
        with pytest.raises(SettingError, match="override_generation_config must be a JSON object"):
            EngineConfig(model=str(tuned), override_generation_config=bad)
    (tuned / "generation_config.json").write_text(json.dumps({"top_p": 2.0}))
    with pytest.raises(ValueError, match="generation_config.json: top_p"):
        make_llm(tuned)
    with pytest.raises(ValueError, match="generation_config.json: top_p"):  # the file's value, not the override's
        make_llm(tuned, override_generation_config={"temperature": 0.3})


def test_generation_config_eos_ids_stop_with_a_separate_tokenizer(llama_dir, tmp_path):
    """The model directory's generation_config.json eos_token_id list ends generation (as vLLM) also when the
    tokenizer comes from another directory (`tokenizer=`): it was read from the tokenizer's directory only."""
    import shutil

    prompt = [5, 9, 13, 21]
    free = make_llm(llama_dir).generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = free[0].outputs[0].token_ids
    stop = tokens[2]
    model = shutil.copytree(llama_dir, tmp_path / "model")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, stop]}))
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_dir / name, tokenizer / name)
    want = tokens[: tokens.index(stop) + 1]
    for kw in ({}, {"tokenizer": str(tokenizer)}):
        out = make_llm(model, **kw).generate([prompt], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
        assert (out[0].outputs[0].token_ids, out[0].outputs[0].finish_reason) == (want, "stop"), kw


def test_a_generation_config_directory_replaces_the_models(llama_dir, tmp_path):
    """vLLM's `--generation-config DIR`: the sampling defaults and eos_token_id of DIR/generation_config.json,
    not the model's; a value that is neither auto, vllm nor such a directory is refused, naming the setting."""
    prompt = [5, 9, 13, 21]
    free = make_llm(llama_dir).generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = free[0].outputs[0].token_ids
    stop = tokens[3]
    folder = tmp_path / "generation"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"top_k": 1, "max_new_tokens": 5, "eos_token_id": stop}))
    llm = make_llm(llama_dir, generation_config=str(folder))
    assert llm.get_default_sampling_params() == SamplingParams(top_k=1, max_tokens=5)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason) == (tokens[: tokens.index(stop) + 1], "stop")
    for bad, says in (("autoo", "'autoo' does not exist"), (str(tmp_path), "has no generation_config.json")):
        with pytest.raises(FileNotFoundError, match=f"generation_config .*{says} .*--generation-config"):
            make_llm(llama_dir, generation_config=bad)


def test_the_chat_template_setting_replaces_the_tokenizers(llama_dir, tmp_path):
    """EngineConfig.chat_template (vLLM's --chat-template), a file or the template's text, renders every chat of
    the engine and of the server's tokenizer; a per-call chat_template still wins. A path that does not exist and a
    template that does not compile stop the start, naming the setting."""
    from miniserve.config import EngineConfig
    from miniserve.server.state import load_tokenizer

    template = (
        "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    (tmp_path / "chat.jinja").write_text(template)
    chat = [{"role": "user", "content": "hi"}]
    for setting in (str(tmp_path / "chat.jinja"), template):
        llm = make_llm(llama_dir, chat_template=setting)
        tok = llm.get_tokenizer()
        out = llm.chat(chat, SamplingParams(max_tokens=1), use_tqdm=False)[0]
        assert tok.decode(out.prompt_token_ids).endswith("[user:hi]>")
        out = llm.chat(chat, SamplingParams(max_tokens=1), use_tqdm=False, chat_template="{{ messages[0].role }}!")[0]
        assert tok.decode(out.prompt_token_ids).endswith("user!")
        server_tok = load_tokenizer(EngineConfig(model=str(llama_dir), chat_template=setting))
        assert server_tok.render_chat(chat, add_generation_prompt=False) == "[user:hi]"
    with pytest.raises(FileNotFoundError, match="chat template file '.*missing.jinja' does not exist"):
        make_llm(llama_dir, chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="chat_template does not compile"):
        make_llm(llama_dir, chat_template="{% for m in messages %}")


def test_chat_takes_vllms_template_arguments(llama_dir):
    """LLM.chat's tools, chat_template, chat_template_kwargs and continue_final_message reach the template (read
    back from the prompt's text); the template's own inputs cannot be set through chat_template_kwargs."""
    llm = make_llm(llama_dir)
    tok = llm.get_tokenizer()
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    template += "|{{ tools[0].function.name }}|{{ mood }}"
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]
    params = SamplingParams(max_tokens=1)
    out = llm.chat(chat, params, use_tqdm=False, add_generation_prompt=False, tools=tools, chat_template=template,
                   chat_template_kwargs={"mood": "calm"})[0]  # fmt: skip
    assert tok.decode(out.prompt_token_ids).endswith("<user>hi</user><assistant>Once upon</assistant>|lookup|calm")
    out = llm.chat(chat, params, use_tqdm=False, add_generation_prompt=False, continue_final_message=True,
                   tools=tools, chat_template=template)[0]  # fmt: skip
    assert tok.decode(out.prompt_token_ids).endswith("<user>hi</user><assistant>Once upon")
    with pytest.raises(ValueError, match="add_generation_prompt"):
        llm.chat(chat, params, continue_final_message=True)
    out = llm.chat(chat[:1], params, use_tqdm=False, add_generation_prompt=False, continue_final_message=True,
                   tools=tools, chat_template=template)[0]  # fmt: skip
    assert tok.decode(out.prompt_token_ids).endswith("<user>hi")  # any role's message continues, as in transformers
    with pytest.raises(ValueError, match="chat_template_kwargs may not set tools"):
        llm.chat(chat, params, chat_template_kwargs={"tools": tools})
    with pytest.raises(ValueError, match="chat_template_kwargs must be a dict, got str"):
        llm.chat(chat, params, chat_template_kwargs="x")
    bad_messages = [
        ({"role": None, "content": "hi"}, "a 'role' string"),
        ({"role": "user", "content": {"a": 1}}, "content must be a string or a list of parts"),
        ({"role": "user", "content": 5}, "content must be"),
    ]
    for bad, what in bad_messages:
        with pytest.raises(ValueError, match=f"messages\\[0\\].*{what}"):
            llm.chat([bad], params)


@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e4m3fnuz"])
def test_triton_backend_matches_torch_backend(llama_dir, kv):
    """The Triton kernels (in the interpreter here, natively on a GPU) drive the engine to the same tokens and
    leave the same KV cache: byte for byte in FP8 (one quantization, whatever the backend), within float32
    rounding of the layer ops otherwise."""
    prompts = token_prompts(3, seed=14, lo=3, hi=20)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tri = make_llm(llama_dir, kv_cache_dtype=kv, attention_backend="triton", block_size=8)
    ref = make_llm(llama_dir, kv_cache_dtype=kv, attention_backend="torch", block_size=8)
    assert tri.engine.target.backend == "triton" and ref.engine.target.backend == "torch"
    assert greedy_ids(tri, prompts, params) == greedy_ids(ref, prompts, params)
    tri_kv, ref_kv = tri.engine.target.kv_pool, ref.engine.target.kv_pool
    assert tri_kv.dtype == ref_kv.dtype and (ref_kv.view(torch.uint8) != 0).sum() > 1000  # the prompts were written
    if kv == "auto":
        torch.testing.assert_close(tri_kv, ref_kv, rtol=0, atol=1e-5)
    else:
        assert torch.equal(tri_kv.view(torch.uint8), ref_kv.view(torch.uint8))


def test_decode_splits_by_batch_reaches_the_kernel_and_keeps_the_tokens(llama_dir, monkeypatch):
    """decode_splits="by-batch": every attention layer carries it, the decode kernel is launched with the short
    splits it picks for a batch of 3 (contexts of 66-92 tokens: two splits each, where by-length has one),
    and greedy tokens stay the torch reference's."""
    from miniserve.kernels import decode_attention as decode_module

    prompts = token_prompts(3, seed=16, lo=66, hi=90)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    tri = make_llm(llama_dir, attention_backend="triton", decode_splits="by-batch")
    assert {layer.self_attn.decode_splits for layer in tri.engine.target.model.layers} == {"by-batch"}
    picked = []
    original = decode_module.split_tokens_for
    monkeypatch.setattr(decode_module, "split_tokens_for", lambda *a: picked.append(original(*a)) or picked[-1])
    got = greedy_ids(tri, prompts, params)
    assert picked and set(picked) == {64}
    assert got == greedy_ids(make_llm(llama_dir, attention_backend="torch"), prompts, params)


def test_engine_seed_makes_unseeded_sampling_repeatable(llama_dir):
    prompt = token_prompts(1, seed=15)[0]
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    a = greedy_ids(make_llm(llama_dir, seed=3), [prompt], params)
    b = greedy_ids(make_llm(llama_dir, seed=3), [prompt], params)
    c = greedy_ids(make_llm(llama_dir, seed=4), [prompt], params)
    assert a == b and a != c


@pytest.mark.parametrize("chunk", [4096, 7])
def test_prompt_logprobs_match_transformers(llama_dir, chunk):
    """Every prompt token's logprob (and the top-N) equals transformers' log_softmax of the previous position,
    with whole and chunked prefill, and with n > 1 choices sharing the prompt."""
    import transformers

    prompt = token_prompts(1, seed=16, lo=20, hi=21)[0]
    llm = make_llm(llama_dir, max_num_batched_tokens=chunk)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, n=2, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], -1)
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry = out.prompt_logprobs[i]
        assert abs(entry[prompt[i]] - ref[i - 1, prompt[i]].item()) < 1e-4
        assert set(ref[i - 1].topk(3).indices.tolist()) <= set(entry)
        assert_vllm_logprobs(entry, prompt[i], ref[i - 1], 3, tok)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].prompt_logprobs is None


def test_prompt_logprobs_survive_preemption(llama_dir):
    prompts = token_prompts(4, seed=17, lo=20, hi=30)
    params = SamplingParams(temperature=0, max_tokens=30, prompt_logprobs=0, ignore_eos=True)
    big = make_llm(llama_dir).generate(prompts, params, use_tqdm=False)
    small = make_llm(llama_dir, num_kv_blocks=9, block_size=8)
    got = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for a, b in zip(big, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(b.prompt_logprobs) == len(b.prompt_token_ids)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-5 for k in x)
