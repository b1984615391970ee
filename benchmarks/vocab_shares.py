"""How many of a real vocabulary's tokens hold a quote, a newline or a backslash: the tokens xgrammar checks one by
one inside a JSON string, whose share sets what a grammar's mask fill costs (benchmarks/grammar_fill.py).

    python benchmarks/vocab_shares.py cl100k_base.tiktoken gpt2.tiktoken --out benchmarks/results/vocab_shares.json

Reads tiktoken files (one `base64(token) rank` line per token) and Hugging Face tokenizer.json files (byte-level
BPE tokens are mapped back to their bytes). Writes each file's sha256, token count and shares; the synthetic
vocabularies of structured_outputs.py can be drawn with the shares of one of them (`--vocab-like NAME`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import write_result  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "vocab_shares.json"
MARKS = {"quote": b'"', "newline": b"\n", "backslash": b"\\"}


def gpt2_byte_symbols() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable symbol each byte is spelled with -> that byte."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    symbols, shifted = {chr(b): b for b in kept}, 0
    for b in range(256):
        if b not in kept:
            symbols[chr(256 + shifted)] = b
            shifted += 1
    return symbols


def read_tiktoken(data: bytes) -> list[bytes]:
    return [base64.b64decode(line.split()[0]) for line in data.splitlines() if line.strip()]


def read_tokenizer_json(data: bytes) -> list[bytes]:
    """A tokenizer.json's vocabulary (added tokens included) as bytes: byte-level symbols mapped back, any other
    token (SentencePiece-style) as its UTF-8 text with `▁` read as a space."""
    spec = json.loads(data)
    tokens = dict(spec["model"]["vocab"])
    tokens.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    symbols = gpt2_byte_symbols()

    def to_bytes(token: str) -> bytes:
        if all(c in symbols for c in token):
            return bytes(symbols[c] for c in token)
        return token.replace("▁", " ").encode()

    return [to_bytes(t) for t in tokens]


def shares(tokens: list[bytes]) -> dict:
    """The fraction of tokens holding each mark, and holding any of them."""
    n = len(tokens)
    out = {name: sum(mark in t for t in tokens) / n for name, mark in MARKS.items()}
    out["any"] = sum(any(mark in t for mark in MARKS.values()) for t in tokens) / n
    return out


def measure(path: Path) -> dict:
    data = path.read_bytes()
    tokens = read_tokenizer_json(data) if path.suffix == ".json" else read_tiktoken(data)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "tokens": len(tokens), **shares(tokens)}


def measured_shares(name: str, result: Path = RESULT) -> dict[str, float]:
    """The committed shares of the vocabulary `name` (its file's stem), for drawing a synthetic one alike."""
    vocabularies = json.loads(result.read_text())["vocabularies"]
    if name not in vocabularies:
        raise SystemExit(f"no vocabulary {name!r} in {result}: measured are {sorted(vocabularies)}")
    return {mark: vocabularies[name][mark] for mark in MARKS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="tiktoken files or tokenizer.json files")
    ap.add_argument("--source", action="append", default=[], help="NAME=where that file came from (recorded)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    vocabularies, sources = {}, dict(s.split("=", 1) for s in args.source)
    for path in args.files:
        vocabularies[path.stem] = row = measure(path)
        if path.stem in sources:
            row["source"] = sources[path.stem]
        print(f"{path.stem}: {row['tokens']} tokens; " + ", ".join(f"{m} {100 * row[m]:.2f}%" for m in [*MARKS, "any"]))
    if args.out:
        write_result(args.out, {"vocabularies": vocabularies})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
