"""Published numbers come from their result files: the READMEs' rendered blocks equal a fresh rendering, no
performance table is written by hand, and every result file says where it came from."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "scripts" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_equal_their_rendering():
    assert load_renderer().main(["--check"]) == 0


def test_a_changed_number_is_caught(tmp_path, monkeypatch):
    """Break the README on purpose: the check must fail."""
    render = load_renderer()
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    marker = "<!-- render:throughput -->\n"
    readme.write_text(text.replace(marker, marker + "| an edited row |\n"))
    monkeypatch.setattr(render, "BLOCKS", {readme: render.BLOCKS[ROOT / "README.md"]})
    assert render.main(["--check"]) == 1


def tables_outside_blocks(text: str) -> list[str]:
    """Markdown table lines outside the rendered blocks (and the results README's history block)."""
    text = re.sub(r"<!-- render:([\w-]+) -->.*?<!-- /render:\1 -->", "", text, flags=re.S)
    text = re.sub(r"<!-- history -->.*?<!-- /history -->", "", text, flags=re.S)
    return [line for line in text.splitlines() if line.startswith("|")]


def test_no_hand_written_performance_table():
    results = (ROOT / "benchmarks" / "results" / "README.md").read_text(encoding="utf-8")
    assert tables_outside_blocks(results) == []
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    performance = readme[readme.index("## Performance") :]
    assert tables_outside_blocks(performance[: performance.index("\n## ", 1)]) == []


def test_every_result_file_records_its_provenance():
    render = load_renderer()
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert files
    for path in files:
        p = render.meta(json.loads(path.read_text()))
        assert p["commit"] or p.get("recorded_in"), path.name  # older runs: the commit that added the file
        assert p["date"] and p["command"] and p["versions"].get("torch") and p["device"], path.name
        assert p["dirty"] is not None or not p["commit"], path.name


def test_write_result_records_commit_dirty_flag_date_command_and_versions(tmp_path):
    from benchmarks.provenance import write_result

    data = json.loads(write_result(tmp_path / "r.json", {"rows": [1]}).read_text())
    p = data["provenance"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert data["rows"] == [1] and p["commit"] == head and isinstance(p["dirty"], bool)
    assert p["versions"]["torch"] and p["date"].startswith("20") and Path(sys.argv[0]).name in p["command"]


def test_the_sweep_says_whether_its_kv_dtypes_alternated(monkeypatch):
    """Row 5's note follows the sweep file: medians of its rounds where throughput.py --rounds wrote them."""
    render = load_renderer()
    files = {"throughput_sweep_llama1b_h200.json": {"runs": [], "rounds": [[], [], []]}}
    monkeypatch.setattr(render, "load", files.get)
    assert render.sweep_rounds_note() == "its numbers are medians of 3 rounds that alternate bf16 and fp8"
    files["throughput_sweep_llama1b_h200.json"] = {"runs": []}
    assert "back to back" in render.sweep_rounds_note()


def test_the_sweep_spread_covers_every_round_at_batch_8_and_up():
    render = load_renderer()

    def runs(bf16: list[float], fp8: list[float]) -> list[dict]:
        points = lambda speeds: [{"batch": b, "output_tok_s": s} for b, s in zip((1, 8, 64), speeds)]  # noqa: E731
        return [{"kv_cache_dtype": "auto", "sweep": points(bf16)}, {"kv_cache_dtype": "fp8", "sweep": points(fp8)}]

    rounds = [runs([1, 100, 100], [9, 90, 110]), runs([1, 100, 100], [9, 105, 120])]
    sweep = {"gpu": "G", "rounds": rounds, "runs": runs([1, 100, 100], [9, 97.5, 115])}
    note = render.sweep_spread_note(sweep, "`f`")
    assert "(`f`, 2 rounds)" in note and "spread over 0.90-1.20 and their medians over 0.97-1.15" in note
    assert "cannot settle" in note and "at or above" not in note  # a round below 1 (0.90) leaves it open
    ahead = [runs([1, 100, 100], [9, 100, 110]), runs([1, 100, 100], [0.5, 105, 120])]  # batch 1 does not count
    verdict = "fp8 at or above bf16 at every point of every round of that run"
    assert verdict in render.sweep_spread_note({**sweep, "rounds": ahead}, "`f`")
    assert render.sweep_spread_note({"gpu": "G", "rounds": rounds[:1], "runs": rounds[0]}, "`f`") == ""
