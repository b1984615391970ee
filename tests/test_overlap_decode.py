"""Overlapped plain decoding (`async_scheduling`): step N+1 starts from step N's samples on the device.

The oracle is the same engine with async_scheduling=False, which reads every step before planning the next:
tokens, texts, finish reasons and logprobs must not change, whatever happens to the batch while a step is in
flight (stops on EOS, stop strings and lengths, arrivals, aborts, preemption), and the KV pool must be whole
when the engine is idle.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from miniserve import LLM, SamplingParams
from tests.test_spec_decode import mixed_prompts


def generate(path, prompts, params, dtype="float32", **kw):
    llm = LLM(str(path), dtype=dtype, device="cpu", **kw)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = [[(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs] for o in outs]
    return result, llm.engine


def assert_idle(engine) -> None:
    assert engine.decoder.in_flight is None
    assert engine.block_manager.num_used_blocks == 0
    assert all(count == 0 for count in engine.block_manager.ref_counts)


@pytest.mark.parametrize(("kv", "dtype"), [("auto", "float32"), ("fp8", "float32"), ("auto", "bfloat16")])
def test_overlapped_decoding_equals_stepwise_decoding(llama_dir, kv, dtype):
    """bfloat16: overlapped steps sample from the model-dtype logits, stepwise ones from their fp32 copy."""
    prompts = mixed_prompts(5)
    # lengths that end at different steps, EOS allowed, a stop string, logprobs, seeded sampling and n > 1
    params = [
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=31),
        SamplingParams(temperature=0, max_tokens=19, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=7, n=2, max_tokens=23, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, stop=["a"]),
    ]
    want, _ = generate(llama_dir, prompts, params, dtype, kv_cache_dtype=kv, async_scheduling=False)
    got, engine = generate(llama_dir, prompts, params, dtype, kv_cache_dtype=kv)
    assert got == want
    assert engine.decoder.num_overlapped_steps > 0
    assert_idle(engine)


def test_steps_that_need_their_history_overlap_and_equal_stepwise_decoding(llama_dir):
    """Penalties, min_tokens and bad words read the output so far: the host reads the step in flight while the
    next forward runs, then builds the sampling batch from the histories that include it. Seeded sampling with
    every one of them, and EOS allowed, gives what the stepwise engine gives."""
    prompts = mixed_prompts(6)[:4]
    params = [
        SamplingParams(temperature=0, max_tokens=12, repetition_penalty=3.0, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=14, presence_penalty=2.0, frequency_penalty=2.0),
        # EOS (id 1) favoured: the stepwise engine ends this one with EOS as its 10th token, the first allowed
        SamplingParams(temperature=0, max_tokens=16, min_tokens=9, logit_bias={1: 60.0}),
        SamplingParams(temperature=0.8, seed=5, max_tokens=10, bad_words=["a"], ignore_eos=True),
    ]
    want, _ = generate(llama_dir, prompts, params, async_scheduling=False)
    got, engine = generate(llama_dir, prompts, params)
    assert got == want and engine.decoder.num_overlapped_steps > 0
    assert len(want[2][0][0]) == 10 and want[2][0][0][-1] == 1 and want[2][0][2] == "stop"
    assert_idle(engine)


def test_a_bad_word_of_several_tokens_is_banned_while_steps_overlap(llama_dir):
    """A bad word spelled by several tokens has no ban until its first tokens are out: the overlapped steps must
    still rebuild the batch when they come (they reused the batch built without a ban, and the word came out)."""
    from miniserve.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(llama_dir)
    prompt = mixed_prompts(3)[2]
    plain_params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    (plain,), _ = generate(llama_dir, [prompt], plain_params, async_scheduling=False)
    ids = plain[0][0]
    # two generated tokens that spell a word only as that pair (no single-token spelling to ban at every step)
    word, pair = next(
        (w, ids[i : i + 2])
        for i in range(2, len(ids) - 1)
        for w in [tok.decode(ids[i : i + 2]).strip()]
        if w
        and " " not in w
        and ids[i : i + 2] in (tok.encode(w, False), tok.encode(" " + w, False))
        and all(len(tok.encode(v, False)) > 1 for v in (w, " " + w))
    )
    params = replace(plain_params, bad_words=[word])
    (want,), _ = generate(llama_dir, [prompt], params, async_scheduling=False)
    (got,), engine = generate(llama_dir, [prompt], params)
    assert got == want and engine.decoder.num_overlapped_steps > 0
    out = got[0][0]
    assert out != ids and not any(out[i : i + 2] == pair for i in range(len(out) - 1)), word


@pytest.mark.parametrize("background", [False, True])
def test_grammar_constrained_steps_overlap_and_equal_stepwise_decoding(background, monkeypatch):
    """A grammar's mask for step N+1 needs step N's token: it is filled after reading step N, while step N+1's
    forward runs (on the engine's thread; with `background`, as on a GPU, a helper thread draws the noise and
    detokenizes step N and applies its stop rules meanwhile), and step N+1 is sampled then. Seeded
    JSON-constrained sampling (the demo model), with logprobs, a penalty and a stop string that cuts some outputs
    short, equals the stepwise engine's, ends with the grammar or the stop string (finish "stop"), and the steps
    were overlapped."""
    pytest.importorskip("xgrammar")
    import threading

    from miniserve.engine import decoder as decoder_module
    from miniserve.engine import structured_output
    from miniserve.engine.output_processor import OutputProcessor
    from miniserve.sampling_params import StructuredOutputsParams

    threads = {"fill": set(), "noise": set(), "text": set()}  # which threads filled masks, drew noise, detokenized

    def on_thread(name, fn):
        return lambda *args: (threads[name].add(threading.get_ident()), fn(*args))[1]

    monkeypatch.setattr(structured_output, "fill_rows", on_thread("fill", structured_output.fill_rows))
    monkeypatch.setattr(decoder_module, "draw_noise", on_thread("noise", decoder_module.draw_noise))
    monkeypatch.setattr(OutputProcessor, "finish_sampled", on_thread("text", OutputProcessor.finish_sampled))

    schema = {"type": "object", "properties": {"who": {"enum": ["ROMEO", "JULIET"]}, "ok": {"type": "boolean"}}}
    spec = StructuredOutputsParams(json={**schema, "required": ["who", "ok"]}, disable_any_whitespace=True)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured_outputs=spec, n=2) for s in range(3)]
    params.append(replace(params[0], seed=7, logprobs=2, presence_penalty=0.5, stop=['"ROMEO"']))
    prompts = ["ROMEO:", "JULIET:", "Thou", "ROMEO:"]
    outs = {}
    for overlap in (False, True):
        llm = LLM(dtype="float32", device="cpu", async_scheduling=overlap)
        llm.engine.decoder.masks.beside = background
        result = llm.generate(prompts, params, use_tqdm=False)
        outs[overlap] = [[(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs] for o in result]
        engine = llm.engine
    assert outs[True] == outs[False]
    assert all(c[2] == "stop" and c[1].startswith('{"who":') for o in outs[True] for c in o)
    assert any(c[1] == '{"who": ' for c in outs[True][3])  # a stop string ended it (else JSON ends with "}")
    assert all(c[1].endswith("}") for o in outs[True][:3] for c in o)
    assert engine.decoder.num_overlapped_steps > 0
    assert_idle(engine)
    engine_thread = threading.get_ident()
    assert threads["fill"] == {engine_thread}
    for work in ("noise", "text"):
        assert threads[work] and (engine_thread in threads[work]) is not background


def test_sequences_ending_by_length_leave_the_batch_without_stopping_it(llama_dir, monkeypatch):
    """Output lengths that end at different steps (nano-vllm's benchmark): a sequence whose token in flight is its
    last by max_tokens is left out of the next step, launched before that token is read, and the rest go on from
    their own samples (picked out of the step's rows on the device). Seeded sampling and greedy rows give what the
    stepwise engine gives, and after the prompts the scheduler is asked only once, when the batch ran out."""
    prompts = [p for p in mixed_prompts(9) if len(p) > 1]
    lengths = [3, 11, 6, 17]
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 0.7, seed=i, max_tokens=n, ignore_eos=True)
        for i, n in enumerate(lengths)
    ]
    want, _ = generate(llama_dir, prompts, params, async_scheduling=False)
    llm = LLM(str(llama_dir), dtype="float32", device="cpu")
    engine = llm.engine
    schedule, asked = engine.scheduler.schedule, []

    def counted():
        scheduled = schedule()
        asked.append([(s.seq.request_id, s.num_new_tokens) for s in scheduled])
        return scheduled

    monkeypatch.setattr(engine.scheduler, "schedule", counted)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    got, computed = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[int(out.request_id)] = [(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in out.outputs]
        computed += engine.last_step_num_tokens  # what each step launched (the iteration-tokens histogram)
    assert [got[i] for i in range(len(prompts))] == want
    assert [len(c[0]) for w in want for c in w] == lengths
    decode_plans = [plan for plan in asked if plan and all(n == 1 for _, n in plan)]
    assert len(decode_plans) == 1  # the first decode step; every later one continued the batch in flight
    assert computed == sum(map(len, prompts)) + sum(n - 1 for n in lengths)  # each prompt once, then a token a step
    assert_idle(engine)


def test_small_pool_preempts_between_overlapped_steps(llama_dir):
    """A pool too small for every sequence: the batch cannot continue when blocks run short, so the step in
    flight is read before the scheduler preempts."""
    prompts = mixed_prompts(7)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    kw = dict(block_size=4, num_kv_blocks=40)
    want, _ = generate(llama_dir, prompts, params, async_scheduling=False, **kw)
    got, engine = generate(llama_dir, prompts, params, **kw)
    assert got == want
    assert engine.scheduler.num_preemptions > 0 and engine.decoder.num_overlapped_steps > 0
    assert_idle(engine)


def test_arrivals_and_aborts_while_a_step_is_in_flight(llama_dir):
    prompts = mixed_prompts(8)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want, _ = generate(llama_dir, prompts[:3], params, async_scheduling=False)
    llm = LLM(str(llama_dir), dtype="float32", device="cpu")
    engine = llm.engine
    engine.add_request("a", prompts[0], params)
    engine.add_request("gone", prompts[3], params)
    finished, step, in_flight_seen = {}, 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        step += 1
        in_flight_seen += engine.decoder.in_flight is not None
        if step == 4:
            engine.abort_request("gone")  # while its step is in flight
            engine.add_request("b", prompts[1], params)
        if step == 9:
            engine.add_request("c", prompts[2], params)
    assert in_flight_seen > 0
    assert [finished["a"], finished["b"], finished["c"]] == [w[0][0] for w in want]
    assert "gone" not in finished
    assert_idle(engine)


def test_final_only_outputs_detokenize_once_with_the_same_text():
    """LLM.generate reports finished requests only and detokenizes them at the end; the engine's streaming
    (cumulative) outputs of the same requests give the same text, token ids and finish reasons."""
    llm = LLM(device="cpu")  # the demo model: byte-fallback BPE, so sampled text has partial UTF-8 sequences
    prompts = ["ROMEO:", "Ἀθῆναι ünïcödé", "KING"]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, top_k=4000) for s in range(3)]
    final = llm.generate(prompts, params, use_tqdm=False)
    engine, streamed = llm.engine, {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"s{i}", prompt, p)
    steps_with_output = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps_with_output += bool(outs)
        for out in outs:
            streamed[out.request_id] = out
    assert steps_with_output > 3  # cumulative requests report while they run
    for i, out in enumerate(final):
        want = streamed[f"s{i}"].outputs[0]
        got = out.outputs[0]
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)


def test_requests_taken_while_a_launch_is_held_run_right_after_the_step_in_flight(llama_dir):
    """The served engine's launch hold (engine/launch_hold.py): requests and aborts that its wait applies in the
    middle of engine.step() are scheduled by that same step, after the step in flight and before any other decode
    step; every output equals stepwise decoding's. (On the CPU no GPU time is measured, so the hold only looks:
    every wait is for 0 s.)"""
    prompts = mixed_prompts(8)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want, _ = generate(llama_dir, prompts[:3], params, async_scheduling=False)
    engine = LLM(str(llama_dir), dtype="float32", device="cpu").engine
    timeouts, calls = [], {"n": 0}
    arrivals = {4: [("abort", "gone"), ("add", "b", 1)], 9: [("add", "c", 2)]}

    def wait(timeout: float) -> bool:
        timeouts.append(timeout)
        calls["n"] += 1
        for what, rid, *i in arrivals.get(calls["n"], []):
            engine.abort_request(rid) if what == "abort" else engine.add_request(rid, prompts[i[0]], params)
        return calls["n"] in arrivals

    engine.hold_launches(wait)
    engine.add_request("a", prompts[0], params)
    engine.add_request("gone", prompts[3], params)
    finished, first_token_at = {}, {}
    while engine.has_unfinished_requests():
        held_before = calls["n"]
        for out in engine.step():
            first_token_at.setdefault(out.request_id, calls["n"])
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        if calls["n"] in arrivals and held_before < calls["n"]:  # this step applied them: their prompts ran in it
            assert all(first_token_at.get(rid) == calls["n"] for what, rid, *_ in arrivals[calls["n"]] if what == "add")
    assert set(timeouts) == {0.0} and calls["n"] > 9
    assert [finished["a"], finished["b"], finished["c"]] == [w[0][0] for w in want]
    assert "gone" not in finished
    assert_idle(engine)
