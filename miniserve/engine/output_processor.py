"""Output processing: what happens to a token once it is chosen.

Append it (with its logprobs) to its sequence, detokenize it (incrementally; once at the end for a final-only
request without stop strings; never with detokenize=False), apply the stop rules (EOS, stop token ids, stop
strings, max_tokens, the context length), and report every request that progressed (`RequestOutput`s, or the
engine process's tuples). Both decoders, plain and speculative, emit tokens through the same two steps (`_take`:
the token, its logprobs and its grammar; `_text_and_stops`: its text and the other stop rules), so the stop rules
are written once. A finished sequence is handed back to the scheduler at once, which frees its KV blocks before
the next step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from miniserve.detokenizer import IncrementalDetokenizer
from miniserve.engine.outputs import CompletionOutput, RequestOutput, logprob_dicts
from miniserve.engine.sampler import SamplerOutput, token_ranks
from miniserve.engine.stop_strings import StopMatcher
from miniserve.engine.transfer import to_device
from miniserve.sampling_params import SamplingParams
from miniserve.scheduler.scheduler import Scheduler
from miniserve.scheduler.sequence import Sequence

logger = logging.getLogger("miniserve.engine")


@dataclass(eq=False)
class Request:
    """One request as the engine tracks it: its `n` sequences, their detokenizers, its stop-string matcher."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    stop_matcher: StopMatcher | None = None  # None without stop strings; each sequence keeps its own state
    reported: list[tuple[int, int]] = field(init=False)  # output_kind "delta": (tokens, characters) per choice
    ended: list[bool] = field(init=False)  # collect_messages: whether each choice's finish was reported
    prompt_logprobs_reported: bool = False
    # collect(): the Logprob dicts made so far (each once), per choice and of the prompt
    logprob_objects: list[list] = field(init=False)
    prompt_logprob_objects: list = field(default_factory=list)
    single_plain: bool = field(init=False)  # streamed with one choice, no stop strings, no logprobs of any kind

    def __post_init__(self) -> None:
        self.reported = [(0, 0)] * len(self.seqs)
        self.logprob_objects = [[] for _ in self.seqs]
        self.ended = [False] * len(self.seqs)
        p = self.params
        self.single_plain = (
            len(self.seqs) == 1
            and self.stop_matcher is None
            and p.output_kind != "final_only"
            and p.logprobs is None
            and p.prompt_logprobs is None
        )


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, eos_token_ids: set[int], max_model_len: int, tokenizer: Any = None):
        self.scheduler = scheduler
        self.tokenizer = tokenizer  # decodes the tokens of collect()'s Logprob objects
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.num_generation_tokens = 0
        self.num_prompt_tokens = 0  # of requests whose prompt pass is done

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req

    def abort(self, request_id: str) -> None:
        """Forget the request; its unfinished sequences leave the scheduler with their blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    # ---------------------------------------------------------------- tokens in

    def append_sampled(self, seqs: list[Sequence], out: SamplerOutput) -> None:
        """Append one sampled token per sequence, with its logprobs, and apply the stop rules."""
        token_ids, logprobs, tops, ranks = _columns(out)
        for row, (seq, token) in enumerate(zip(seqs, token_ids)):
            lp = logprobs[row] if logprobs is not None else None
            top = _top(seq, tops, row) if tops is not None else None
            rank = ranks[row] if ranks is not None else None
            # append_token, inlined: every row of every step (take_sampled + finish_sampled cost 10% more at 256)
            if self._take(seq, token, lp, top, rank):
                self._text_and_stops(seq, token)

    def take_sampled(self, seqs: list[Sequence], out: SamplerOutput) -> list[tuple[Sequence, int]]:
        """append_sampled's first half: each token joins its sequence and its grammar (which may end it); returns
        the (sequence, token) pairs whose text and other stop rules `finish_sampled` applies. Split so that a
        constrained step can fill its next masks, which need only the grammars, beside that second half
        (decoder.py: PlainDecoder._next_batch)."""
        token_ids, logprobs, tops, ranks = _columns(out)
        taken = []
        for row, (seq, token) in enumerate(zip(seqs, token_ids)):
            lp = logprobs[row] if logprobs is not None else None
            top = _top(seq, tops, row) if tops is not None else None
            rank = ranks[row] if ranks is not None else None
            if self._take(seq, token, lp, top, rank):
                taken.append((seq, token))
        return taken

    def finish_sampled(self, taken: list[tuple[Sequence, int]]) -> None:
        """append_sampled's second half: the text and the stop rules of the tokens `take_sampled` appended."""
        for seq, token in taken:
            self._text_and_stops(seq, token)

    def append_token(
        self, seq: Sequence, token: int, logprob: float | None, top: dict[int, float] | None, rank: int | None = None
    ) -> None:
        if self._take(seq, token, logprob, top, rank):
            self._text_and_stops(seq, token)

    def _take(
        self, seq: Sequence, token: int, logprob: float | None, top: dict[int, float] | None, rank: int | None = None
    ) -> bool:
        """Append the token and its logprobs, and feed it to the sequence's grammar, which ends the sequence once
        it is complete (or on a token it rejects); False, and nothing done, when the sequence had finished."""
        if seq.is_finished:
            return False
        seq.token_ids.append(token)
        self.num_generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
            # its prompt is computed: counted here as vLLM does, for each choice (vLLM's n child requests each
            # count theirs, whether computed or found in the prefix cache)
            self.num_prompt_tokens += seq.num_prompt_tokens
        if seq.logprobs is not None:
            entry = dict(top or {})
            entry[token] = logprob
            seq.logprobs.append(entry)
            seq.logprob_ranks.append(rank)
        if logprob is not None:
            seq.cumulative_logprob += logprob
        if seq.grammar is not None and _grammar_ends(seq, token):
            self._finish(seq, "stop", None)
        return True

    def _text_and_stops(self, seq: Sequence, token: int) -> None:
        """Detokenize the token just taken and apply the other stop rules (a grammar that ended the sequence
        leaves only its text to add, or none: drops_stop_token_text)."""
        req = self.requests[seq.request_id]
        detok = req.detokenizers[seq.index]
        on_token = seq.is_finished or _ends_on_token(seq, token, self.eos_token_ids)  # grammar's end, EOS, stop id
        at_length = self._length_reached(seq)
        if not seq.params.detokenize or _detokenize_at_end(seq.params):
            self._check_stop(seq, token, "", None, on_token, at_length)
            if seq.params.detokenize and seq.is_finished:  # all at once: as token by token ("".join(deltas) + flush())
                ids = seq.output_token_ids
                seq.text = detok.add(ids[:-1] if _drops_last_text(seq) else ids) + detok.flush()
            return
        if on_token:
            self._check_stop(seq, token, "", None, on_token, at_length)
            seq.text += ("" if _drops_last_text(seq) else detok.add([token])) + detok.flush()
            return
        # its last token by length releases the held text (an unfinished character: its U+FFFD is final now), and
        # its stop strings are matched in it like any text
        delta = detok.add([token]) + (detok.flush() if at_length else "")
        seq.text += delta
        self._check_stop(seq, token, delta, req.stop_matcher, on_token, at_length)

    def _length_reached(self, seq: Sequence) -> bool:
        """The sequence's last token by length: max_tokens, or max_model_len."""
        max_tokens = seq.params.max_tokens
        return (max_tokens is not None and seq.num_output_tokens >= max_tokens) or seq.num_tokens >= self.max_model_len

    def _check_stop(
        self, seq: Sequence, token: int, delta: str, matcher: StopMatcher | None, on_token: bool, at_length: bool
    ) -> None:
        p = seq.params
        if seq.is_finished:  # its grammar ended it (_take)
            return None
        match = None
        if matcher is not None and delta:  # the matcher reads every character, even before min_tokens
            seq.stop_state, match = matcher.feed(seq.stop_state, delta)
        if on_token:  # EOS or a stop token id (_ends_on_token, decided once by _text_and_stops)
            return self._finish(seq, "stop", None if _is_eos(seq, token, self.eos_token_ids) else token)
        if match is not None and _stop_strings_count(seq):
            last, stop = match  # `stop` ends at delta[last]
            end = len(seq.text) - len(delta) + last + 1
            seq.text = seq.text[: end if p.include_stop_str_in_output else end - len(stop)]
            return self._finish(seq, "stop", stop)
        if at_length:  # (_length_reached)
            return self._finish(seq, "length", None)
        return None

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.finished_time = time.monotonic()
        self.scheduler.finish(seq)

    # ---------------------------------------------------------------- outputs out

    def collect(self, progressed: list[Sequence]) -> list[RequestOutput]:
        """One cumulative RequestOutput per request that progressed; finished requests are forgotten."""
        outputs = []
        for req in self._reporting(progressed):
            out = self._delta_output(req) if req.params.output_kind == "delta" else self._request_output(req)
            if req.params.logprobs is not None or req.params.prompt_logprobs is not None:
                _with_logprob_objects(req, out, self.tokenizer)
            outputs.append(out)
            if out.finished:
                del self.requests[req.request_id]
        return outputs

    def collect_messages(self, progressed: list[Sequence]) -> list[tuple]:
        """collect() for the engine process, without RequestOutput objects (at 256 streams a step, building them
        was a millisecond of every step): per request that has news, (request_id, finished, choices,
        prompt_logprobs, final_metrics), choices being (index, token_ids, text, logprobs, finish_reason,
        stop_reason, cumulative_logprob) of those that brought tokens or text or just finished; a final_only
        request's whole output once; final_metrics (with num_cached_tokens) only when it finished."""
        messages = []
        for req in self._reporting(progressed):
            if req.single_plain and not req.seqs[0].is_finished:  # most streams, most steps (256 a step)
                msg = _running_plain_delta(req, req.seqs[0])
            elif req.params.output_kind == "final_only":  # finished (_reporting): everything at once
                msg = _message_of(self._request_output(req))
            else:  # what is new since the last message, "cumulative" requests included
                msg = self._delta_message(req)
            if msg is not None and msg[3] is not None:  # (complete) with each prompt token's rank beside
                msg = (*msg[:3], (msg[3], req.seqs[0].prompt_logprob_ranks[: len(msg[3])]), msg[4])
            if msg is not None:
                messages.append(msg)
            if msg is not None and msg[1]:
                del self.requests[req.request_id]
        return messages

    def _reporting(self, progressed: list[Sequence]) -> list[Request]:
        """The requests that progressed and report now (once each; final_only ones only when finished)."""
        reqs, seen = [], set()
        for seq in progressed:
            req = self.requests.get(seq.request_id)
            if req is None or seq.request_id in seen:
                continue
            seen.add(seq.request_id)
            if req.params.output_kind == "final_only" and not all(s.is_finished for s in req.seqs):
                continue
            reqs.append(req)
        return reqs

    def _delta_message(self, req: Request) -> tuple | None:
        """collect_messages for a request that is not final_only: what _delta_output reports, as a tuple; None when
        nothing is new."""
        matcher = req.stop_matcher
        choices = []
        for s in req.seqs:
            hold = matcher.held(s.stop_state) if matcher else 0
            tokens, text, logprobs, req.reported[s.index] = _news(s, hold, req.reported[s.index])
            if tokens or text or (s.finish_reason is not None and not req.ended[s.index]):
                cumulative = s.cumulative_logprob if req.params.logprobs is not None else None
                choices.append((s.index, tokens, text, logprobs, s.finish_reason, s.stop_reason, cumulative))
                req.ended[s.index] = s.finish_reason is not None
        finished = all(s.is_finished for s in req.seqs)
        prompt_logprobs = _new_prompt_logprobs(req)
        if not choices and prompt_logprobs is None and not finished:
            return None
        final = {**_metrics(req), "num_cached_tokens": req.seqs[0].num_cached_tokens or 0} if finished else None
        return req.request_id, finished, choices, prompt_logprobs, final

    def _delta_output(self, req: Request) -> RequestOutput:
        """output_kind "delta": only what is new since the request's last report (tokens, text, logprobs); the
        prompt's logprobs once they are complete; the metrics with the last report."""
        matcher = req.stop_matcher
        completions = []
        for s in req.seqs:
            hold = matcher.held(s.stop_state) if matcher else 0
            completion, req.reported[s.index] = _delta_completion(s, req.params, hold, req.reported[s.index])
            completions.append(completion)
        finished = all(s.is_finished for s in req.seqs)
        prompt_logprobs = _new_prompt_logprobs(req)
        return _output(req, completions, finished, _metrics(req) if finished else {}, prompt_logprobs)

    def _request_output(self, req: Request) -> RequestOutput:
        matcher = req.stop_matcher
        completions = [_completion(s, req.params, matcher.held(s.stop_state) if matcher else 0) for s in req.seqs]
        finished = all(s.is_finished for s in req.seqs)
        prompt_logprobs = req.seqs[0].prompt_logprobs
        prompt_logprobs = list(prompt_logprobs) if prompt_logprobs is not None else None
        return _output(req, completions, finished, _metrics(req), prompt_logprobs)


def _output(req: Request, completions: list, finished: bool, metrics: dict, prompt_logprobs) -> RequestOutput:
    return RequestOutput(
        req.request_id,
        req.prompt,
        req.prompt_token_ids,
        completions,
        finished,
        metrics,
        prompt_logprobs,
        req.seqs[0].num_cached_tokens or 0,
    )


def _news(seq: Sequence, hold: int, reported: tuple[int, int]) -> tuple[list[int], str, list | None, tuple]:
    """What one choice adds to its report so far (token ids, text, logprobs; the last `hold` characters stay back
    while they may begin a stop string), and the new (tokens, characters) reported."""
    num_tokens, num_chars = reported
    visible = len(seq.text) if seq.is_finished else max(num_chars, len(seq.text) - hold)
    logprobs = seq.logprobs[num_tokens:] if seq.logprobs is not None else None
    tokens = seq.token_ids[seq.num_prompt_tokens + num_tokens :]
    return tokens, seq.text[num_chars:visible], logprobs, (seq.num_output_tokens, visible)


def _running_plain_delta(req: Request, seq: Sequence) -> tuple | None:
    """_delta_message of a running Request.single_plain one, with nothing to hold back, weigh or end: its new
    tokens and text, or None."""
    tokens, text, _, req.reported[0] = _news(seq, 0, req.reported[0])
    if not tokens and not text:
        return None
    return req.request_id, False, [(seq.index, tokens, text, None, None, None, None)], None, None


def _delta_completion(seq: Sequence, params: SamplingParams, hold: int, reported: tuple[int, int]) -> tuple:
    """_news as a CompletionOutput, and the new (tokens, characters) reported."""
    tokens, text, logprobs, now = _news(seq, hold, reported)
    cumulative = seq.cumulative_logprob if params.logprobs is not None else None
    return CompletionOutput(seq.index, text, tokens, seq.finish_reason, seq.stop_reason, logprobs, cumulative), now


def _message_of(out: RequestOutput) -> tuple:
    """A final_only request's finished output in collect_messages' form: every choice, all at once."""
    choices = [
        (o.index, o.token_ids, o.text, o.logprobs, o.finish_reason, o.stop_reason, o.cumulative_logprob)
        for o in out.outputs
    ]
    final = {**out.metrics, "num_cached_tokens": out.num_cached_tokens}
    return out.request_id, True, choices, out.prompt_logprobs, final


def _columns(out: SamplerOutput) -> tuple[list[int], list[float] | None, tuple[list, list] | None, list | None]:
    """A step's samples as host lists: token ids, their logprobs, the top logprobs (ids, values), their ranks."""
    logprobs = out.logprobs.tolist() if out.logprobs is not None else None
    tops = None
    if out.top_logprobs is not None:
        tops = (out.top_logprobs[0].tolist(), out.top_logprobs[1].tolist())
    ranks = out.ranks.tolist() if out.ranks is not None else None
    return out.token_ids.tolist(), logprobs, tops, ranks


def _top(seq: Sequence, tops: tuple[list, list], row: int) -> dict[int, float] | None:
    """The top logprobs `seq` asked for, from its row of a step's."""
    n = seq.params.logprobs
    return dict(zip(tops[0][row][:n], tops[1][row][:n])) if n is not None else None


def drops_stop_token_text(finish_reason: str | None, stop_reason: int | str | None, params: SamplingParams) -> bool:
    """A choice that a token ended (EOS, a stop token id, its grammar's end) leaves that token's text out of its
    own, as vLLM does, unless include_stop_str_in_output; the token id stays in its token_ids."""
    return finish_reason == "stop" and not isinstance(stop_reason, str) and not params.include_stop_str_in_output


def _is_eos(seq: Sequence, token: int, eos_token_ids: set[int]) -> bool:
    return not seq.params.ignore_eos and token in eos_token_ids


def _ends_on_token(seq: Sequence, token: int, eos_token_ids: set[int]) -> bool:
    """EOS or one of the request's stop token ids, once min_tokens are out."""
    p = seq.params
    if seq.num_output_tokens < p.min_tokens:
        return False
    return _is_eos(seq, token, eos_token_ids) or bool(p.stop_token_ids and token in p.stop_token_ids)


def _stop_strings_count(seq: Sequence) -> bool:
    """A stop string ends a sequence only in text from the token after min_tokens on (vLLM's rule)."""
    return seq.num_output_tokens > seq.params.min_tokens


def _drops_last_text(seq: Sequence) -> bool:
    return drops_stop_token_text(seq.finish_reason, seq.stop_reason, seq.params)


def _detokenize_at_end(params: SamplingParams) -> bool:
    """Nobody reads the text before the request finishes, and no stop string is searched in it."""
    return params.output_kind == "final_only" and not params.stop


def _grammar_ends(seq: Sequence, token: int) -> bool:
    """Feed the grammar the new token; the sequence ends once the grammar has accepted its stop token (also with
    ignore_eos: nothing may follow), or on a token the grammar rejects (never sampled: it is masked)."""
    if not seq.grammar.accept(token):
        logger.warning("request %s: a token its grammar rejects; stopping it", seq.request_id)
        return True
    return seq.grammar.terminated


def _completion(seq: Sequence, params: SamplingParams, hold: int) -> CompletionOutput:
    """A snapshot of one choice. While it runs, the last `hold` characters stay back: they begin a stop string
    that the next tokens may complete (and that must then not have been streamed)."""
    text = seq.text if seq.is_finished or hold == 0 else seq.text[: max(0, len(seq.text) - hold)]
    return CompletionOutput(
        index=seq.index,
        text=text,
        token_ids=seq.output_token_ids,  # a fresh slice: a snapshot
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
        logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
        cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None else None,
    )


def _new_prompt_logprobs(req: Request) -> list | None:
    """The prompt's logprobs, once: when they are complete and were not reported before."""
    prompt_logprobs = req.seqs[0].prompt_logprobs
    complete = prompt_logprobs is not None and len(prompt_logprobs) == len(req.prompt_token_ids)
    if req.prompt_logprobs_reported or not complete:
        return None
    req.prompt_logprobs_reported = True
    return prompt_logprobs


def _metrics(req: Request) -> dict:
    first = [s.first_token_time for s in req.seqs if s.first_token_time is not None]
    scheduled = [s.first_scheduled_time for s in req.seqs if s.first_scheduled_time is not None]
    done = [s.finished_time for s in req.seqs if s.finished_time is not None]
    return {
        "arrival_time": min(s.arrival_time for s in req.seqs),
        "first_scheduled_time": min(scheduled) if scheduled else None,
        "first_token_time": min(first) if first else None,
        "finished_time": max(done) if len(done) == len(req.seqs) else None,
        # each choice's own (first scheduled, first token, finished): vLLM times each of n choices as a request
        "choices": [(s.first_scheduled_time, s.first_token_time, s.finished_time) for s in req.seqs],
        "num_spec_drafts": sum(s.num_spec_drafts for s in req.seqs),
        "num_spec_draft_tokens": sum(s.num_spec_draft_tokens for s in req.seqs),
        "num_spec_accepted_tokens": sum(s.num_spec_accepted_tokens for s in req.seqs),
    }


def record_prompt_logprobs(seq: Sequence, logits: torch.Tensor, start_pos: int) -> None:
    """Row j (position start_pos + j) predicts prompt token start_pos + j + 1; positions scored before a
    preemption are not scored twice."""
    first = len(seq.prompt_logprobs) - start_pos - 1  # the first row not scored yet
    last = min(logits.shape[0], seq.num_prompt_tokens - start_pos - 1)
    if first < 0 or first >= last:  # (first < 0 cannot happen: choice 0 always computes its prompt)
        return
    logprobs = torch.log_softmax(logits[first:last].float(), dim=-1)
    targets = seq.prompt_token_ids[start_pos + first + 1 : start_pos + last + 1]
    chosen = logprobs.gather(1, to_device(targets, torch.int64, logits.device)[:, None])
    ranks = token_ranks(logprobs, chosen).tolist()
    chosen = chosen.squeeze(1).tolist()
    n = seq.params.prompt_logprobs
    tops = logprobs.topk(n, dim=-1) if n else None
    top_ids, top_vals = (tops.indices.tolist(), tops.values.tolist()) if tops is not None else ([], [])
    for j, (token, lp) in enumerate(zip(targets, chosen)):
        entry = dict(zip(top_ids[j], top_vals[j])) if n else {}
        entry[token] = lp
        seq.prompt_logprobs.append(entry)
    seq.prompt_logprob_ranks += ranks


def _with_logprob_objects(req: Request, out: RequestOutput, tokenizer: Any) -> None:
    """collect()'s outputs carry vLLM's Logprob dicts (engine/outputs.py); collect_messages' keep plain floats (they
    cross a pipe, and pickled Logprob objects cost a hundred times more), the prompt's with their ranks beside
    (the API process makes the dicts: server/engine_process.py:RequestStream.apply)."""
    decode = None
    if req.params.detokenize and tokenizer is not None:
        decode = lambda t: tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731 (vLLM's decoded_token)
    for o in out.outputs:
        if o.logprobs:  # a cumulative or final output has them all, a delta the last few
            seq = req.seqs[o.index]
            made = req.logprob_objects[o.index]
            tokens = seq.token_ids[seq.num_prompt_tokens :]
            _extend(made, seq.logprobs, tokens, seq.logprob_ranks, seq.params.logprobs, decode)
            o.logprobs = made[len(made) - len(o.logprobs) :]
    if out.prompt_logprobs is not None:  # (a cumulative output's may be partial: a chunked prompt)
        out.prompt_logprobs = _prompt_logprob_objects(req, len(out.prompt_logprobs), decode)


def _prompt_logprob_objects(req: Request, count: int, decode: Any) -> list:
    """The first `count` of the prompt's logprobs as Logprob dicts (each made once)."""
    seq = req.seqs[0]
    made = req.prompt_logprob_objects
    num_top = req.params.prompt_logprobs
    _extend(made, seq.prompt_logprobs, seq.prompt_token_ids, seq.prompt_logprob_ranks, num_top, decode)
    return made[:count]


def _extend(made: list, entries: list, tokens: list[int], ranks: list, num_top: int, decode: Any) -> None:
    """Add the Logprob dicts of entries[len(made):]."""
    k = len(made)
    made += logprob_dicts(entries[k:], tokens[k:], ranks[k:], num_top, decode)
