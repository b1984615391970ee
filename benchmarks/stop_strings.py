"""Cost of the stop-string check per generated token, against the number and length of stop strings.

Compares the incremental matcher the engine uses (miniserve/engine/stop_strings.py: an Aho-Corasick automaton,
one state per sequence) with checking every stop string against the tail of the text after every token (what
vLLM and SGLang do, and what miniserve did before). Text arrives in pieces of a few characters, as tokens do.
CPU only; no model needed.

    python benchmarks/stop_strings.py
"""

from __future__ import annotations

import argparse
import random
import string
import time

from miniserve.engine.stop_strings import StopMatcher


def tail_scan(stops: list[str], pieces: list[str]) -> int | None:
    """The per-token scan: after each piece, look for every stop string in the window it could end in."""
    text = ""
    for piece in pieces:
        text += piece
        for stop in stops:
            idx = text.find(stop, max(0, len(text) - len(piece) - len(stop) + 1))
            if idx != -1:
                return idx
    return None


def automaton(matcher: StopMatcher, pieces: list[str]) -> int | None:
    state, seen = 0, 0
    for piece in pieces:
        state, match = matcher.feed(state, piece)
        if match is not None:
            return seen + match[0] + 1 - len(match[1])
        seen += len(piece)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4000, help="pieces of text per run")
    parser.add_argument("--chars-per-token", type=int, default=4)
    args = parser.parse_args()
    rng = random.Random(0)
    alphabet = string.ascii_letters + " \n.,"
    text = "".join(rng.choice(alphabet) for _ in range(args.tokens * args.chars_per_token))
    pieces = [text[i : i + args.chars_per_token] for i in range(0, len(text), args.chars_per_token)]
    print(f"{'stops':>6} {'length':>6} {'tail scan us/token':>19} {'automaton us/token':>19} {'its build ms':>12}")
    for count, length in ((1, 8), (4, 16), (32, 16), (32, 256), (1000, 16), (10000, 16)):
        stops = ["".join(rng.choice(alphabet) for _ in range(length - 1)) + "#" for _ in range(count)]  # never match
        t0 = time.perf_counter()
        matcher = StopMatcher(stops)  # once per request
        build = time.perf_counter() - t0
        times = []
        for fn, arg in ((tail_scan, stops), (automaton, matcher)):
            t0 = time.perf_counter()
            assert fn(arg, pieces) is None
            times.append((time.perf_counter() - t0) / len(pieces) * 1e6)
        print(f"{count:>6} {length:>6} {times[0]:>19.2f} {times[1]:>19.2f} {build * 1e3:>12.2f}")


if __name__ == "__main__":
    main()
