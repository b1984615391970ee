"""OutputProcessor.collect_messages (what the engine process sends) against collect (the RequestOutputs offline
users get): two engines run the same seeded requests step by step, and every message must be the RequestOutput
of the same step with the choices that brought nothing left out (written here from the RequestOutput alone)."""

from __future__ import annotations

from miniserve import LLM, SamplingParams


def _as_messages(outs, ended: dict) -> list[tuple]:
    """The oracle: the RequestOutputs of one step as the engine process's tuples."""
    messages = []
    for out in outs:
        seen = ended.setdefault(out.request_id, [False] * len(out.outputs))
        choices = []
        for o in out.outputs:
            if o.token_ids or o.text or (o.finish_reason is not None and not seen[o.index]):
                choices.append(
                    (o.index, o.token_ids, o.text, o.logprobs, o.finish_reason, o.stop_reason, o.cumulative_logprob)
                )
                seen[o.index] = o.finish_reason is not None
        final = {**out.metrics, "num_cached_tokens": out.num_cached_tokens} if out.finished else None
        prompt = None
        if out.prompt_logprobs is not None:  # (float dicts, the prompt tokens' ranks): made into dicts by the server
            chosen = out.prompt_token_ids
            floats = [None if e is None else {t: lp.logprob for t, lp in e.items()} for e in out.prompt_logprobs]
            ranks = [None if e is None else e[t].rank for e, t in zip(out.prompt_logprobs, chosen)]
            prompt = (floats, ranks)
        if choices or prompt is not None or out.finished:
            messages.append((out.request_id, out.finished, choices, prompt, final))
    return messages


def _requests() -> list[tuple[str, str, SamplingParams]]:
    delta = dict(output_kind="delta", temperature=0.9, ignore_eos=True)
    return [
        ("a", "ROMEO:", SamplingParams(seed=1, max_tokens=9, n=2, logprobs=2, **delta)),
        ("b", "JULIET: O", SamplingParams(seed=2, max_tokens=40, stop=["the king", "and so"], **delta)),  # held text
        ("c", "Thou art", SamplingParams(seed=3, max_tokens=5, prompt_logprobs=1, **delta)),
        ("d", "NURSE:", SamplingParams(seed=4, max_tokens=6, n=2, output_kind="final_only", temperature=0.9)),
        ("e", "MERCUTIO:", SamplingParams(seed=5, max_tokens=12, detokenize=False, **delta)),
        ("f", "HAMLET:", SamplingParams(seed=6, max_tokens=10, **delta)),  # one choice, text, nothing else
    ]


def test_messages_are_the_step_outputs_without_the_choices_that_brought_nothing():
    engines = [LLM(device="cpu").engine for _ in range(2)]
    for engine in engines:
        for rid, prompt, params in _requests():
            engine.add_request(rid, prompt, params)
    ended, steps = {}, 0
    while engines[0].has_unfinished_requests():
        # the same step on both: the timestamps in the final metrics (each choice's too) differ, the rest must not
        got = engines[0].step_messages()
        want = _as_messages(engines[1].step(), ended)
        for message in got + want:
            if message[4] is not None:
                message[4].update({k: None for k in message[4] if k.endswith("_time") or k == "choices"})
        assert got == want, steps
        steps += 1
    assert not engines[1].has_unfinished_requests() and steps > 5
