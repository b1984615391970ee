"""The structured-output benchmarks run on the CPU at tiny sizes, so they cannot rot (GPU numbers:
benchmarks/results/structured_outputs_h200.json, grammar_fill_h200.json)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("xgrammar")

from benchmarks import grammar_fill, structured_outputs  # noqa: E402


def test_grammar_fill_times_every_strategy_on_the_same_states(tmp_path):
    """Every strategy fills the masks the rows filled alone give (the script asserts it each step) and is timed."""
    out = tmp_path / "fill.json"
    argv = ["--vocab", "3000", "--batch", "3", "--steps", "4", "--threads", "2", "--schemas", "open", "--out", str(out)]
    assert grammar_fill.main(argv) == 0
    rows = json.loads(out.read_text())["schemas"]["open"]
    assert set(rows) == {"rows", "batch auto", "batch 2", "groups 2", "python pool 2"}
    assert all(r["median_ms"] > 0 for r in rows.values())


def test_the_synthetic_vocabulary_sets_its_share_of_quotes_and_newlines(tmp_path):
    """--quote-weight: the benchmark vocabulary's multi-character tokens hold a quote or a newline about 7% of the
    time each (weight 1, every published result), about a fifth as often at 0.2, never at 0."""
    share = {}
    for weight in (1.0, 0.2, 0.0):
        structured_outputs.write_bpe_tokenizer(tmp_path, 20000, 0, 1, quote_weight=weight)
        words = [w for w in json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"] if len(w) > 1]
        share[weight] = [sum(c in w for w in words) / len(words) for c in ('"', "Ċ")]
    assert all(0.05 < x < 0.09 for x in share[1.0])
    assert all(0.1 < x / y < 0.3 for x, y in zip(share[0.2], share[1.0]))
    assert share[0.0] == [0.0, 0.0]


def test_structured_outputs_benchmark_smoke(tmp_path):
    """--smoke: a one-layer model of the shape; both runs make every token asked for, and the constrained one fills a
    mask at every step (the timer wraps structured_output.fill_rows, which every batch's fill calls)."""
    out = tmp_path / "so.json"
    argv = ["--smoke", "--batch", "2", "--prompt", "8", "--gen", "6", "--repeats", "1", "--schemas", "open"]
    argv += ["--root", str(tmp_path / "ckpt"), "--out", str(out), "--unseeded", "--foreground", "--host-split"]
    assert structured_outputs.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["smoke"] and result["batch"] == 2
    runs = ("unconstrained", "constrained_open", "constrained_open_fg", "unconstrained_unseeded")
    for key in (*runs, "constrained_open_unseeded"):
        assert result[key]["generated_tokens"] == 2 * 6
    for key in ("constrained_open", "constrained_open_fg", "constrained_open_unseeded"):
        assert result[key]["mask_calls_per_run"] >= 5  # a mask for every constrained step
    assert set(result["ratios"]) == {"open", "open_fg", "open_unseeded"} and min(result["ratios"].values()) > 0
    split = result["constrained_open"]["host_ms_per_step"]
    assert split["engine_step"] > split["next_batch"] > 0 and split["fill_on_helper"] > 0
