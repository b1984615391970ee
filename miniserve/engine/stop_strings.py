"""Stop strings, matched incrementally: one Aho-Corasick automaton per request, one state per sequence.

Checking every stop string against the tail of the text after every token costs (number of stop strings) x
(their length) per token, so a long stop list slows every request that shares the engine thread. The automaton
reads each new character once and follows at most a few links, whatever the number of stop strings: the work
per token is proportional to the text the token added. A match that spans tokens is found without rescanning.

The state also says how much text to hold back while streaming: its depth is the longest tail of the text
that is the beginning of some stop string (and so may still turn into one), usually nothing, instead of
always the longest stop string's length minus one.

Which stop wins: the one that is complete first, reading character by character; if several end on the same
character, the longest (it starts earliest, so the least text survives it).
"""

from __future__ import annotations

from collections import deque


class StopMatcher:
    """The automaton of one request's stop strings; a sequence's progress is a state number (0 = root)."""

    def __init__(self, stops: list[str]):
        self._goto: list[dict[str, int]] = [{}]  # trie edges: node -> {character: child}
        self._depth: list[int] = [0]  # length of the prefix a node spells
        self._stop: list[str | None] = [None]  # the longest stop string that ends at this node
        for stop in stops:
            node = 0
            for ch in stop:
                node = self._goto[node].get(ch) or self._new_child(node, ch)
            if self._stop[node] is None:
                self._stop[node] = stop
        self._fail = self._failure_links()

    def _new_child(self, node: int, ch: str) -> int:
        child = len(self._goto)
        self._goto[node][ch] = child
        self._goto.append({})
        self._depth.append(self._depth[node] + 1)
        self._stop.append(None)
        return child

    def _failure_links(self) -> list[int]:
        """For each node, the longest proper suffix of its prefix that is also a trie node (breadth first, so
        shorter prefixes are done first). A node that is no stop itself inherits its suffix's stop."""
        fail = [0] * len(self._goto)
        queue = deque(self._goto[0].values())
        while queue:
            node = queue.popleft()
            for ch, child in self._goto[node].items():
                f = fail[node]
                while f and ch not in self._goto[f]:
                    f = fail[f]
                fail[child] = self._goto[f].get(ch, 0)
                if self._stop[child] is None:
                    self._stop[child] = self._stop[fail[child]]
                queue.append(child)
        return fail

    def feed(self, state: int, text: str) -> tuple[int, tuple[int, str] | None]:
        """Read `text` from `state`: (the state after all of it, (index in `text` of the last character of the
        first stop string completed, that stop string) or None)."""
        goto, fail, stop_at = self._goto, self._fail, self._stop
        first = None
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if first is None and stop_at[state] is not None:
                first = (i, stop_at[state])
        return state, first

    def held(self, state: int) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        return self._depth[state]


def check_stop_strings(stops: list[str], max_count: int, max_length: int) -> None:
    """The bounds a request's stop list must keep (EngineConfig.max_stop_strings / max_stop_string_length)."""
    if len(stops) > max_count:
        raise ValueError(f"stop: {len(stops)} stop strings, more than the limit of {max_count} (max_stop_strings)")
    longest = max(stops, key=len, default="")
    if len(longest) > max_length:
        raise ValueError(
            f"stop: a stop string of {len(longest)} characters, longer than the limit of {max_length} "
            "(max_stop_string_length)"
        )
