"""The incremental stop-string matcher against the definition, checked by brute force on the whole text.

Definition: reading the text one character at a time, the first stop string that is complete wins; if several
end on that character, the longest. While none has completed, the text that must be held back is the longest
tail of the text that begins some stop string. A small alphabet makes overlaps, shared prefixes and stops
inside other stops common.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miniserve.engine.stop_strings import StopMatcher, check_stop_strings

ALPHABET = "ab\nçé🙂"


def first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(end index exclusive, stop) of the winner, straight from the definition."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return end, max(done, key=len)
    return None


def held(text: str, stops: list[str]) -> int:
    return max((k for k in range(1, len(text) + 1) if any(s.startswith(text[-k:]) for s in stops)), default=0)


@settings(max_examples=250, deadline=None)
@given(
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=6),
    pieces=st.lists(st.text(ALPHABET, max_size=4), max_size=12),
)
def test_matcher_agrees_with_the_definition(stops, pieces):
    matcher = StopMatcher(stops)
    state, text, found = 0, "", None
    for piece in pieces:
        before = len(text)
        text += piece
        state, match = matcher.feed(state, piece)
        if match is not None:
            i, stop = match
            found = (before + i + 1, stop)
            break
        assert matcher.held(state) == held(text, stops)
    assert found == first_stop(text, stops)


def test_examples():
    m = StopMatcher(["bcd", "a"])  # not list order: "a" completes first
    assert m.feed(0, "xabcd")[1] == (1, "a")
    m = StopMatcher(["bc", "abc"])  # both end on "c": the longer one
    assert m.feed(0, "xabc")[1] == (3, "abc")
    m = StopMatcher(["aaabz", "ab"])  # "ab" ends inside the prefix "aaab": a stop inherited through a suffix link
    assert m.feed(0, "aaab")[1] == (3, "ab")
    m = StopMatcher(["aaaba", "bb"])  # "aaab" fails to "b" past "aa" and "a", which have no "b": then "bb" ends
    assert m.feed(0, "aaabb")[1] == (4, "bb")
    m = StopMatcher(["\n\nQuestion:"])
    state, match = m.feed(0, "The answer is 4.\n")
    assert match is None and m.held(state) == 1  # only the newline could start the stop string
    state, match = m.feed(state, "\nQuest")
    assert match is None and m.held(state) == 7
    state, match = m.feed(state, "ioned")  # not it after all: nothing held
    assert match is None and m.held(state) == 0
    m = StopMatcher(["abc"])
    state, match = m.feed(0, "abb")  # no tail of "abb" begins "abc": back to the root, not to "a"
    assert match is None and m.held(state) == 0
    assert m.feed(state, "c") == (0, None)


def test_bounds_are_inclusive():
    check_stop_strings(["x"] * 4, max_count=4, max_length=3)
    check_stop_strings(["xyz"], max_count=4, max_length=3)
    check_stop_strings([], max_count=4, max_length=3)
    with pytest.raises(ValueError, match="5 stop strings, more than the limit of 4"):
        check_stop_strings(["x"] * 5, max_count=4, max_length=3)
    with pytest.raises(ValueError, match="4 characters, longer than the limit of 3"):
        check_stop_strings(["ok", "wxyz"], max_count=4, max_length=3)
    with pytest.raises(ValueError, match=r"4 characters, longer than the limit of 3 \(max_stop_string_length\)$"):
        check_stop_strings(["zz", "aaaa"], max_count=4, max_length=3)  # the longest, not the greatest, string
    with pytest.raises(ValueError, match=r"limit of 4 \(max_stop_strings\)$"):
        check_stop_strings(["x"] * 5, max_count=4, max_length=3)


# ---------------------------------------------------------------------------------------------- in the engine


def run(engine, prompt: str, params) -> tuple[list[str], object]:
    """Every text the engine showed for choice 0, step by step, and the final completion."""
    from miniserve.engine.llm_engine import LLMEngine

    assert isinstance(engine, LLMEngine)
    rid = f"r{id(params)}"
    engine.add_request(rid, prompt, params)
    shown, last = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            shown.append(out.outputs[0].text)
            last = out.outputs[0]
    return shown, last


@pytest.fixture(scope="module")
def engine(llama_dir):
    from miniserve.config import EngineConfig
    from miniserve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(llama_dir), device="cpu", dtype="float32", max_stop_strings=30))


def test_engine_cuts_at_the_first_stop_and_streams_only_text_no_stop_can_claim(engine):
    from miniserve.sampling_params import SamplingParams

    greedy = dict(temperature=0, max_tokens=40, ignore_eos=True)
    _, free = run(engine, "ROMEO:", SamplingParams(**greedy))
    text = free.text
    assert len(text) > 30
    # stops that span token boundaries, one that occurs later, one that is a suffix of another, and filler
    stops = [text[20:27], text[9:15], text[12:15], text[25:40]] + [f"@{i}#" for i in range(26)]
    end, stop = first_stop(text, stops)
    assert stop == text[9:15] and end == 15
    for keep in (False, True):
        shown, out = run(engine, "ROMEO:", SamplingParams(**greedy, stop=stops, include_stop_str_in_output=keep))
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert out.text == text[: end if keep else end - len(stop)]
        for before, after in zip(shown, shown[1:]):  # a stream only ever appends ...
            assert after.startswith(before)
        assert all(out.text.startswith(s) for s in shown)  # ... and never text that a stop later cuts off


def test_engine_bounds_the_stop_list(engine):
    from miniserve.sampling_params import SamplingParams

    ok = SamplingParams(max_tokens=1, stop=["x" * 256] + ["y"] * 29)  # exactly the limits: 30 strings, 256 chars
    engine.add_request("at-limit", "ROMEO:", ok)
    engine.abort_request("at-limit")
    with pytest.raises(ValueError, match="31 stop strings, more than the limit of 30"):
        engine.add_request("too-many", "ROMEO:", SamplingParams(stop=["y"] * 31))
    with pytest.raises(ValueError, match="257 characters, longer than the limit of 256"):
        engine.add_request("too-long", "ROMEO:", SamplingParams(stop=["x" * 257]))
    assert not engine.has_unfinished_requests()
