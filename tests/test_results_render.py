"""Published numbers come from their result files: the READMEs' rendered blocks equal a fresh rendering."""

from __future__ import annotations

import importlib.util
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
