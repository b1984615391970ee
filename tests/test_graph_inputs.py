"""The packed inputs of captured passes, checked on the CPU.

CUDA graphs exist only on GPUs, but what feeds them does not: rows packed into a staging buffer, padding rows,
the unpacking inside the captured function and the logits picked from its output. Here `BucketedGraphs._capture`
is replaced by an eager stand-in whose "replay" reruns the same function on the same static buffer, so every
line of `BucketedGraphs.run`, `ModelRunner.forward`'s graph path and the greedy round's packing runs as on a GPU. The
oracle is the same engine without graphs.
"""

from __future__ import annotations

import pytest
import torch

from miniserve import LLM, SamplingParams
from miniserve.engine.cuda_graphs import BucketedGraphs, _Graph, packed_buffer
from tests.test_spec_decode import mixed_prompts


class EagerReplay:
    def __init__(self, fn, static, outputs):
        self.fn, self.static, self.outputs = fn, static, outputs

    def replay(self) -> None:
        for out, new in zip(self.outputs, self.fn(self.static), strict=True):
            out.copy_(new)


def eager_capture(self: BucketedGraphs, bucket: int) -> None:
    static = packed_buffer(self.width, bucket, self.padding)  # column-major, as the real ones
    outputs = tuple(out.clone() for out in self.fn(static.t()))
    # as the real ones: padding rows point at block 0
    staging = tuple(packed_buffer(self.width, bucket, self.padding) for _ in range(2))
    self.graphs[bucket] = _Graph(EagerReplay(self.fn, static.t(), outputs), static, outputs, staging, [None, None])


def engine_with_stand_in_graphs(llm: LLM):
    eng = llm.engine
    for worker in eng.workers:
        worker.use_graphs = True
    eng._capture_graphs()
    return eng


def generate(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_packed_graph_inputs_reproduce_the_eager_engine(monkeypatch, llama_dir, temperature):
    monkeypatch.setattr(BucketedGraphs, "_capture", eager_capture)
    kw = dict(dtype="float32", device="cpu", max_num_seqs=8)
    params = SamplingParams(temperature=temperature, seed=3, max_tokens=12, ignore_eos=True)
    prompts = mixed_prompts()  # 5 sequences: padded up to the bucket of 8
    plain = LLM(str(llama_dir), **kw)
    want = generate(plain, prompts, params)
    graphed = LLM(str(llama_dir), **kw)
    eng = engine_with_stand_in_graphs(graphed)
    assert sorted(eng.target.graphs) == [1] and len(eng.target.graphs[1].graphs) == 4  # buckets 1, 2, 4, 8
    assert generate(graphed, prompts, params) == want


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("k", [1, 4])
def test_packed_speculative_rounds_reproduce_the_eager_engine(monkeypatch, llama_dir, draft_dir, k, temperature):
    """Greedy: the whole round is one packed pass; sampled: the draft's one- and two-token passes and the target's
    (k+1)-token verification are. Either way the tokens equal the engine's without graphs."""
    monkeypatch.setattr(BucketedGraphs, "_capture", eager_capture)
    kw = dict(dtype="float32", device="cpu", max_num_seqs=8, speculative_model=str(draft_dir))
    kw["num_speculative_tokens"] = k
    params = SamplingParams(temperature=temperature, seed=3, max_tokens=12, ignore_eos=True)
    prompts = mixed_prompts()
    eager = LLM(str(llama_dir), **kw)
    want = generate(eager, prompts, params)
    graphed = LLM(str(llama_dir), **kw)
    eng = engine_with_stand_in_graphs(graphed)
    assert sorted(eng.target.graphs) == sorted({1, k + 1}) and sorted(eng.draft.graphs) == [1, 2]
    replays = {n: 0 for n in (1, 2, k + 1)}
    for worker in eng.workers:
        for n, graphs in worker.graphs.items():
            original = graphs.run

            def counted(rows, device_columns=None, n=n, original=original):
                replays[n] += 1
                return original(rows, device_columns)

            graphs.run = counted
    assert generate(graphed, prompts, params) == want
    assert eager.engine.stats()["spec_num_accepted_tokens"] == eng.stats()["spec_num_accepted_tokens"]
    if temperature > 0:  # sampled rounds run on the captured passes
        assert replays[2] > 0 and replays[k + 1] > 0


@pytest.mark.parametrize("speculative", [False, True])
def test_prompt_passes_replay_padded_graphs(monkeypatch, llama_dir, draft_dir, speculative):
    """One-sequence prompt chunks run as a graph captured for a longer, padded length: the padding tokens write
    no KV and the logits are the last real token's. One sequence at a time makes every prompt a lone pass, and a
    small token budget splits the longest into chunks (no logits); the oracle is the same engine without graphs."""
    monkeypatch.setattr(BucketedGraphs, "_capture", eager_capture)
    kw = dict(dtype="float32", device="cpu", max_num_seqs=1, max_num_batched_tokens=24)
    if speculative:
        kw.update(speculative_model=str(draft_dir), num_speculative_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = mixed_prompts()
    eager = LLM(str(llama_dir), **kw)
    want = generate(eager, prompts, params)
    graphed = LLM(str(llama_dir), **kw)
    eng = engine_with_stand_in_graphs(graphed)
    replays = {}
    for worker in eng.workers:
        assert sorted(worker.prefill_graphs) == [n for n in (32, 64, 128, 256, 512) if n <= worker.max_positions]
        for n, graphs in worker.prefill_graphs.items():
            original = graphs.run

            def counted(rows, key=(worker.role, n), original=original):
                replays[key] = replays.get(key, 0) + 1
                return original(rows)

            graphs.run = counted
    assert generate(graphed, prompts, params) == want
    # padding wrote no KV: the same slots hold values (the pools start zeroed), the same ones up to the rounding of
    # a matmul over more rows
    for mine, theirs in zip(eng.workers, eager.engine.workers, strict=True):
        assert torch.equal(mine.kv_pool != 0, theirs.kv_pool != 0)
        torch.testing.assert_close(mine.kv_pool, theirs.kv_pool, rtol=0, atol=1e-5)
    assert replays.get(("target", 32), 0) > 0
    if speculative:
        assert replays.get(("draft", 32), 0) > 0


def _staggered(llm: LLM, prompts, params) -> list[list[int]]:
    """Each prompt added one step after the one before (the ones before it decoding meanwhile): every request's
    tokens."""
    eng = llm.engine
    pending, outs = list(enumerate(prompts)), {}
    while pending or eng.has_unfinished_requests():
        if pending:
            i, ids = pending.pop(0)
            eng.add_request(str(i), ids, params)
        for out in eng.step():
            if out.finished:
                outs[int(out.request_id)] = out.outputs[0].token_ids
    return [outs[i] for i in range(len(prompts))]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_prompt_beside_decodes_runs_as_its_own_prompt_graph(monkeypatch, llama_dir, temperature):
    """A step of decodes plus one prompt chunk runs as a prompt-graph replay, then the decodes' graph, not as one
    eager pass: each request arrives while the ones before it decode. Tokens equal the eager engine's. The decodes
    are launched before the prompt's first token is read (on a GPU they queue behind the prompt pass meanwhile)."""
    monkeypatch.setattr(BucketedGraphs, "_capture", eager_capture)
    kw = dict(dtype="float32", device="cpu", max_num_seqs=8)
    params = SamplingParams(temperature=temperature, seed=5, max_tokens=8, ignore_eos=True)
    prompts = mixed_prompts()  # 1, 7, 23, 14 and 40 tokens (a 1-token prompt is a decode row)
    want = _staggered(LLM(str(llama_dir), **kw), prompts, params)
    graphed = LLM(str(llama_dir), **kw)
    eng = engine_with_stand_in_graphs(graphed)
    prompt_replays, eager_passes = [], []
    for n, graphs in eng.target.prefill_graphs.items():
        original = graphs.run

        def counted(rows, n=n, original=original):
            prompt_replays.append(n)
            return original(rows)

        graphs.run = counted
    prepare = eng.target.prepare

    def eager(inputs):  # only a pass outside every captured graph prepares its inputs this way
        eager_passes.append(len(inputs))
        return prepare(inputs)

    eng.target.prepare = eager
    events = []  # the order of replays and reads: the decodes launch before the prompt's first token is read
    decode_run, append = eng.target.graphs[1].run, eng.outputs.append_sampled
    eng.target.graphs[1].run = lambda *a: events.append("decode") or decode_run(*a)
    eng.outputs.append_sampled = lambda *a: events.append("read") or append(*a)
    for graphs in eng.target.prefill_graphs.values():
        run = graphs.run
        graphs.run = lambda *a, run=run: events.append("prompt") or run(*a)
    assert _staggered(graphed, prompts, params) == want
    assert sorted(prompt_replays) == [32, 32, 32, 64] and eager_passes == []
    after_prompts = [events[i + 1 : i + 3] for i, e in enumerate(events) if e == "prompt"]
    assert after_prompts == [["decode", "read"]] * 4, events


def test_one_token_prompt_chunks_beside_a_decode_score_the_prompt_as_the_eager_engine(monkeypatch, llama_dir):
    """A budget of two tokens a step cuts a prompt arriving beside a decode into one-token chunks, each launched
    as a prompt beside the decodes (PlainDecoder._launch_now) with one row that scores the next prompt token
    (prompt_logprobs): every score and token equals the eager engine's."""
    monkeypatch.setattr(BucketedGraphs, "_capture", eager_capture)
    kw = dict(dtype="float32", device="cpu", max_num_seqs=4, max_num_batched_tokens=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=2)
    prompts = mixed_prompts()[1:3]  # 7 and 23 tokens

    def run(llm: LLM) -> list:
        eng, outs = llm.engine, {}
        eng.add_request("0", prompts[0], params)
        eng.step()
        eng.add_request("1", prompts[1], params)  # its chunks run beside request 0's decodes
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    outs[out.request_id] = (out.outputs[0].token_ids, out.prompt_logprobs)
        return [outs["0"], outs["1"]]

    want = run(LLM(str(llama_dir), **kw))
    graphed = LLM(str(llama_dir), **kw)
    eng = engine_with_stand_in_graphs(graphed)
    launches, launch = [], eng.decoder._launch_now
    eng.decoder._launch_now = lambda sched: launches.append([s.num_new_tokens for s in sched]) or launch(sched)
    got = run(graphed)
    assert launches.count([1]) >= 10  # request 1's one-token chunks beside request 0's decodes
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        assert len(g[1]) == len(w[1])
        for mine, theirs in zip(g[1], w[1]):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert mine.keys() == theirs.keys()
                assert all(abs(mine[t] - theirs[t]) < 1e-5 for t in mine)
