"""The structured-output benchmarks run on the CPU at tiny sizes, so they cannot rot (GPU numbers:
benchmarks/results/structured_outputs_h200.json, grammar_fill_h200.json)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

pytest.importorskip("xgrammar")

from benchmarks import grammar_fill, structured_outputs, structured_outputs_ab, vocab_shares  # noqa: E402


def test_grammar_fill_times_every_strategy_on_the_same_states(tmp_path):
    """Every strategy fills the masks the rows filled alone give (the script asserts it each step) and is timed."""
    out = tmp_path / "fill.json"
    argv = ["--vocab", "3000", "--batch", "3", "--steps", "4", "--threads", "2", "--schemas", "open", "--out", str(out)]
    assert grammar_fill.main(argv) == 0
    rows = json.loads(out.read_text())["schemas"]["open"]
    assert set(rows) == {"rows", "batch auto", "batch 2", "groups 2", "python pool 2", "slowest row"}
    assert all(r["median_ms"] > 0 for r in rows.values())
    # each step's slowest row is one of the 3 rows that step filled one after another: shorter than the 3 together
    assert rows["slowest row"]["median_ms"] < rows["rows"]["median_ms"]
    assert rows["slowest row"]["mean_ms"] < rows["rows"]["mean_ms"]


def test_grammar_fill_walks_the_same_paths_with_and_without_chains(tmp_path):
    """--chained-rules 0 times xgrammar's repetitions, the default the engine's chains: the rows take the same
    random tokens in both (their masks are the same), so the two runs time the same states."""
    paths = []
    for rules in ("0", "40"):
        out = tmp_path / f"fill{rules}.json"
        argv = ["--vocab", "3000", "--batch", "4", "--steps", "60", "--threads", "2", "--schemas", "bounded"]
        assert grammar_fill.main(argv + ["--chained-rules", rules, "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["chained_rules"] == int(rules)
        paths.append(result["paths"]["bounded"])
    assert paths[0] == paths[1]


def _shares_in(tokenizer_json: Path) -> dict[str, float]:
    """Counted here, from the written file's strings (the oracle: not the benchmark's own counting)."""
    words = list(json.loads(tokenizer_json.read_text())["model"]["vocab"])
    marks = {"quote": '"', "newline": "Ċ", "backslash": "\\"}
    return {m: sum(c in w for w in words) / len(words) for m, c in marks.items()}


def test_the_synthetic_vocabulary_takes_a_real_vocabularys_shares(tmp_path):
    """Without `like`: the JSON-heavy vocabulary of the earlier results (~7% of tokens hold a quote, 7% a newline,
    none a backslash in a word); with `like`: each mark as common as asked, and the shares returned are the file's."""
    heavy = structured_outputs.write_bpe_tokenizer(tmp_path, 20000, 0, 1)
    counted = _shares_in(tmp_path / "tokenizer.json")
    assert 0.05 < counted["quote"] < 0.09 and 0.05 < counted["newline"] < 0.09
    assert {m: heavy[m] for m in counted} == pytest.approx(counted, abs=1e-9)
    like = {"quote": 0.0134, "newline": 0.0217, "backslash": 0.0039}
    drawn = structured_outputs.write_bpe_tokenizer(tmp_path, 20000, 0, 1, like=like)
    counted = _shares_in(tmp_path / "tokenizer.json")
    assert {m: drawn[m] for m in counted} == pytest.approx(counted, abs=1e-9)
    for mark, share in like.items():
        assert share * 0.7 < counted[mark] < share * 1.3, (mark, counted[mark])


def test_vocab_shares_reads_tiktoken_and_tokenizer_json(tmp_path):
    """Both formats give the same tokens' shares: a tiktoken file and a byte-level tokenizer.json of one vocabulary
    (byte-level symbols mapped back: Ċ is a newline, Ġ a space)."""
    tokens = [b'"', b"a", b"\n", b'",\n', b"ab", b"\\n", b" x"]
    tik = tmp_path / "v.tiktoken"
    tik.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    symbols = {b: s for s, b in vocab_shares.gpt2_byte_symbols().items()}
    vocab = {"".join(symbols[b] for b in t): i for i, t in enumerate(tokens)}
    tj = tmp_path / "v.json"
    tj.write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    expected = {"quote": 2 / 7, "newline": 2 / 7, "backslash": 1 / 7, "any": 4 / 7}
    for path in (tik, tj):
        row = vocab_shares.measure(path)
        assert row["tokens"] == 7 and {k: row[k] for k in expected} == pytest.approx(expected)


def test_structured_outputs_benchmark_smoke(tmp_path):
    """--smoke: a one-layer model of the shape; both runs make every token asked for, and the constrained one fills a
    mask at every step (the timer wraps structured_output.fill_rows, which every batch's fill calls)."""
    out = tmp_path / "so.json"
    argv = ["--smoke", "--batch", "2", "--prompt", "8", "--gen", "6", "--repeats", "1", "--schemas", "open"]
    argv += ["--root", str(tmp_path / "ckpt"), "--out", str(out), "--unseeded", "--foreground", "--host-split"]
    argv += ["--vocab-like", "cl100k_base"]
    assert structured_outputs.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["smoke"] and result["batch"] == 2
    vocabulary = result["vocabulary"]  # drawn with vocab_shares.json's cl100k_base shares (1.3% quotes, 2.2% newlines)
    assert vocabulary["like"] == "cl100k_base" and 0.01 < vocabulary["shares"]["quote"] < 0.017
    runs = ("unconstrained", "constrained_open", "constrained_open_fg", "unconstrained_unseeded")
    for key in (*runs, "constrained_open_unseeded"):
        assert result[key]["generated_tokens"] == 2 * 6
    for key in ("constrained_open", "constrained_open_fg", "constrained_open_unseeded"):
        assert result[key]["mask_calls_per_run"] >= 5  # a mask for every constrained step
    assert set(result["ratios"]) == {"open", "open_fg", "open_unseeded"} and min(result["ratios"].values()) > 0
    ab = tmp_path / "ab.json"  # structured_outputs_ab.py joins runs: here the run with itself
    assert structured_outputs_ab.main(["--pair", "same", str(out), str(out), "--out", str(ab)]) == 0
    joined = json.loads(ab.read_text())
    assert joined["median_ratios"]["old"] == joined["median_ratios"]["new"] == result["ratios"]
    assert joined["pairs"]["same"]["new"]["vocabulary"] == "cl100k_base"
    split = result["constrained_open"]["host_ms_per_step"]
    assert split["engine_step"] > split["next_batch"] > 0 and split["fill"] > 0
