"""The stop rules of OutputProcessor, token by token, without a model: EOS, stop token ids, stop strings,
min_tokens, max_tokens and the context length, on every text path (streamed text, text detokenized at the end,
no text at all).

The detokenizer is a stand-in whose text is known without running any tokenizer: token t is the character
chr(t), except HELD, whose character only comes out with the next token or at flush (like the tail of an
incomplete UTF-8 sequence), and SPLIT, whose text is "b" and a held "~". The expected texts and finish reasons
are written out by hand.
"""

from __future__ import annotations

import pytest

from miniserve import SamplingParams
from miniserve.engine.output_processor import OutputProcessor, Request
from miniserve.engine.stop_strings import StopMatcher
from miniserve.scheduler.block_manager import BlockManager
from miniserve.scheduler.scheduler import Scheduler
from miniserve.scheduler.sequence import Sequence

EOS = 1
HELD = 500  # its character, "~", is held back until the next token or the end
SPLIT = 501  # "b" at once, then a "~" held back like HELD's
LEAD = 502  # a character's first byte: pending as U+FFFD until CONT completes it ("é") or another token ends it
CONT = 503


class CharDetokenizer:
    def __init__(self) -> None:
        self.held = ""

    def add(self, ids: list[int]) -> str:
        text = self.held
        self.held = ""
        for t in ids:
            if t == HELD:
                self.held = "~"
            elif t == SPLIT:
                text += self.held + "b"
                self.held = "~"
            elif t == LEAD:
                text += self.held
                self.held = "\ufffd"
            elif t == CONT:  # completes a LEAD just before it (held, or in `text`), else is a bad byte itself
                text, self.held = text + self.held, ""
                text = text[:-1] + "é" if text.endswith("\ufffd") else text + "\ufffd"
            else:
                text += self.held + chr(t)
                self.held = ""
        return text

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


def setup(params: SamplingParams, n: int = 1, max_model_len: int = 64, prompt: str = "AB"):
    processor = OutputProcessor(Scheduler(BlockManager(8, 4), 4, 64), {EOS}, max_model_len)
    ids = [ord(c) for c in prompt]
    seqs = [Sequence(i, "r", i, ids, params) for i in range(n)]
    matcher = StopMatcher(params.stop) if params.stop else None
    processor.add(Request("r", prompt, ids, params, seqs, [CharDetokenizer() for _ in seqs], matcher))
    return processor, seqs


def feed(processor: OutputProcessor, seq: Sequence, text_or_ids) -> None:
    for t in text_or_ids:
        processor.append_token(seq, ord(t) if isinstance(t, str) else t, None, None)


def outcome(seq: Sequence) -> tuple:
    return seq.output_token_ids, seq.text, seq.finish_reason, seq.stop_reason


TEXT_PATHS = [
    dict(),  # streamed, cumulative
    dict(output_kind="final_only"),  # detokenized at the end
    dict(detokenize=False),  # no text
]


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("path", TEXT_PATHS)
def test_eos_and_stop_token_ids_after_min_tokens(path, keep):
    """The token that ends a choice stays in its token ids; its text only with include_stop_str_in_output
    (vLLM's detokenizer leaves a stop-terminated request's last token out of the text)."""

    def run(tokens, **kw):
        params = {"max_tokens": 10, "include_stop_str_in_output": keep, **path, **kw}
        processor, (seq,) = setup(SamplingParams(**params))
        feed(processor, seq, tokens)
        return seq, processor

    def text(s):
        return "" if path.get("detokenize") is False else s

    x, y = ord("x"), ord("y")
    seq, _ = run([x, EOS, y])
    assert outcome(seq) == ([x, EOS], text("x" + chr(EOS) if keep else "x"), "stop", None)
    seq, _ = run([x, y, x], stop_token_ids=[y])
    assert outcome(seq) == ([x, y], text("xy" if keep else "x"), "stop", y)
    seq, _ = run([x, EOS, y, y, x], stop_token_ids=[y], min_tokens=3)  # EOS 2nd, y 3rd: y is the first allowed
    assert seq.output_token_ids == [x, EOS, y] and (seq.finish_reason, seq.stop_reason) == ("stop", y)
    seq, processor = run([x, EOS, x, x], ignore_eos=True, max_tokens=3)
    assert seq.output_token_ids == [x, EOS, x] and (seq.finish_reason, seq.stop_reason) == ("length", None)
    assert processor.num_generation_tokens == 3


@pytest.mark.parametrize("path", TEXT_PATHS)
def test_max_tokens_and_the_context_length_end_at_exactly_their_limit(path):
    processor, (seq,) = setup(SamplingParams(max_tokens=3, **path))
    feed(processor, seq, "ab")
    assert seq.finish_reason is None
    if not path:  # streamed: the text is there while the sequence runs
        assert seq.text == "ab"
    feed(processor, seq, "cd")  # the 4th token comes after the end: ignored
    assert seq.output_token_ids == [ord(c) for c in "abc"] and seq.finish_reason == "length"
    processor, (seq,) = setup(SamplingParams(max_tokens=None, **path), max_model_len=5)  # 2 prompt + 3 tokens
    feed(processor, seq, "abcd")
    assert seq.output_token_ids == [ord(c) for c in "abc"] and seq.finish_reason == "length"
    assert seq.text == ("" if path.get("detokenize") is False else "abc")


@pytest.mark.parametrize("keep", [False, True])
def test_a_stop_string_cuts_the_text_where_it_ends(keep):
    params = SamplingParams(max_tokens=20, stop=["cd", "zz"], include_stop_str_in_output=keep)
    processor, (seq,) = setup(params)
    feed(processor, seq, "abcde")
    assert outcome(seq) == ([ord(c) for c in "abcd"], "abcd" if keep else "ab", "stop", "cd")


def test_a_stop_string_before_min_tokens_does_not_stop_and_one_after_does():
    params = SamplingParams(max_tokens=20, stop=["b"], min_tokens=3)
    processor, (seq,) = setup(params)
    feed(processor, seq, "abcb")
    assert outcome(seq) == ([ord(c) for c in "abcb"], "abc", "stop", "b")


@pytest.mark.parametrize("path", [dict(), dict(output_kind="final_only")])
def test_stop_strings_count_from_the_token_after_min_tokens(path):
    """vLLM checks stop strings only once more than min_tokens tokens are out: one ending in the min_tokens-th
    token's text does not stop (exact fit), one ending in the next does, even if it began before."""
    processor, (seq,) = setup(SamplingParams(max_tokens=20, stop=["c"], min_tokens=3, **path))
    feed(processor, seq, "abcdc")
    assert outcome(seq) == ([ord(c) for c in "abcdc"], "abcd", "stop", "c")
    processor, (seq,) = setup(SamplingParams(max_tokens=20, stop=["cd"], min_tokens=3, **path))
    feed(processor, seq, "abcde")
    assert outcome(seq) == ([ord(c) for c in "abcd"], "ab", "stop", "cd")


def test_text_held_by_the_detokenizer_comes_out_at_the_end():
    for params in (SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, output_kind="final_only")):
        processor, (seq,) = setup(params)
        feed(processor, seq, ["a", HELD])
        assert outcome(seq) == ([ord("a"), HELD], "a~", "length", None)
    processor, (seq,) = setup(SamplingParams(max_tokens=5, stop_token_ids=[HELD], include_stop_str_in_output=True))
    feed(processor, seq, ["a", HELD])
    assert outcome(seq) == ([ord("a"), HELD], "a~", "stop", HELD)
    processor, (seq,) = setup(SamplingParams(max_tokens=5, stop_token_ids=[ord("b")]))
    feed(processor, seq, ["a", HELD, "b"])  # the stop token's text is left out, not the held text before it
    assert outcome(seq) == ([ord("a"), HELD, ord("b")], "a~", "stop", ord("b"))


@pytest.mark.parametrize("keep", [False, True])
def test_a_stop_string_in_held_text_stops_as_the_text_comes_out(keep):
    """Held text is matched when it comes out, with the next token (min_tokens counted there), or at the end."""
    processor, (seq,) = setup(SamplingParams(max_tokens=9, stop=["~"], include_stop_str_in_output=keep))
    feed(processor, seq, ["a", HELD, "b"])
    assert outcome(seq) == ([ord("a"), HELD, ord("b")], "a~" if keep else "a", "stop", "~")
    processor, (seq,) = setup(SamplingParams(max_tokens=9, stop=["~"], min_tokens=3))
    feed(processor, seq, ["a", HELD, "b", HELD, "c"])  # the first "~" comes out with the 3rd token: not checked
    assert outcome(seq) == ([ord("a"), HELD, ord("b"), HELD, ord("c")], "a~b", "stop", "~")


def test_a_stop_string_completed_by_the_last_token_max_tokens_allows_is_a_stop():
    """The token that reaches max_tokens also completes "cd": the choice stops on the string (text cut before it),
    as vLLM's detokenizer turns that step's length into a stop; one token later it would not have fit."""
    processor, (seq,) = setup(SamplingParams(max_tokens=4, stop=["cd"]))
    feed(processor, seq, "abcd")
    assert outcome(seq) == ([ord(c) for c in "abcd"], "ab", "stop", "cd")
    processor, (seq,) = setup(SamplingParams(max_tokens=4, stop=["de"]))
    feed(processor, seq, "abcd")
    assert outcome(seq) == ([ord(c) for c in "abcd"], "abcd", "length", None)


def test_an_unfinished_character_is_not_matched_by_a_stop_string_until_it_is_final():
    """A held character still being decoded shows as U+FFFD: a stop string holding U+FFFD waits for its bytes
    (completed, "é", it matches nothing; ended by another token, the U+FFFD is final and stops the sequence)."""
    processor, (seq,) = setup(SamplingParams(max_tokens=9, stop=["\ufffd"]))
    feed(processor, seq, ["a", LEAD, CONT, "b"])
    assert outcome(seq) == ([ord("a"), LEAD, CONT, ord("b")], "aéb", None, None)
    processor, (seq,) = setup(SamplingParams(max_tokens=9, stop=["\ufffd"]))
    feed(processor, seq, ["a", LEAD, "b"])
    assert outcome(seq) == ([ord("a"), LEAD, ord("b")], "a", "stop", "\ufffd")
    # the length ends it while the character is unfinished: its U+FFFD is final then, and matched as the text ends
    cases = [(["\ufffd"], False, ("a", "stop", "\ufffd")), (["\ufffd"], True, ("a\ufffd", "stop", "\ufffd")),
             (["zz"], False, ("a\ufffd", "length", None))]  # fmt: skip
    for stop, keep, expected in cases:
        processor, (seq,) = setup(SamplingParams(max_tokens=2, stop=stop, include_stop_str_in_output=keep))
        feed(processor, seq, ["a", LEAD])
        assert outcome(seq) == ([ord("a"), LEAD], *expected)


@pytest.mark.parametrize("keep", [False, True])
def test_a_stop_string_ending_before_held_text_drops_it(keep):
    processor, (seq,) = setup(SamplingParams(max_tokens=5, stop=["ab"]))
    feed(processor, seq, ["a", HELD, "b"])  # the text so far is "a~b": no stop string in it
    assert seq.finish_reason is None and seq.text == "a~b"
    processor, (seq,) = setup(SamplingParams(max_tokens=5, stop=["b"], include_stop_str_in_output=keep))
    feed(processor, seq, ["a", SPLIT])  # "b" ends the text: the "~" held after it is not output
    assert outcome(seq) == ([ord("a"), SPLIT], "ab" if keep else "a", "stop", "b")


@pytest.mark.parametrize("collect", ["collect", "collect_messages"])
@pytest.mark.parametrize(("tokens", "reason"), [("axy", "length"), (["a", "x", "y", EOS], "stop")])
def test_a_delta_stream_releases_the_held_stop_prefix_when_the_choice_ends(collect, tokens, reason):
    """While "x", then "xy", may begin the stop string "xyz" they are held back from the deltas; a choice that
    ends otherwise (max_tokens, EOS) sends them with its last delta."""
    processor, (seq,) = setup(SamplingParams(max_tokens=len(tokens), stop=["xyz"], output_kind="delta"))
    texts = []
    for t in tokens:
        feed(processor, seq, [t])
        (out,) = getattr(processor, collect)([seq])
        texts.append(out.outputs[0].text if collect == "collect" else out[2][0][2])
    assert texts == ["a"] + [""] * (len(tokens) - 2) + ["xy"] and seq.finish_reason == reason


def test_generation_counters_and_first_token_time():
    processor, (a, b) = setup(SamplingParams(max_tokens=2), n=2)
    feed(processor, a, "x")
    first = a.first_token_time
    assert first is not None and b.first_token_time is None
    feed(processor, a, "yz")  # the 3rd token is past max_tokens: not counted
    feed(processor, b, "x")
    assert a.first_token_time == first  # the first token's time, kept
    assert processor.num_generation_tokens == 3
