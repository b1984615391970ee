"""docs/ARCHITECTURE.md names every hop of a request as `file:function`: each must still exist, so the walk-through
cannot drift from the code it describes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "ARCHITECTURE.md"
HOP = re.compile(r"`([\w/]+\.py):([\w.]+)`")
FILE = re.compile(r"`((?:[\w]+/)*\w+\.py)`")


def definitions(path: Path) -> set[str]:
    """Top-level functions and classes, and `Class.method` for their methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {
                f"{node.name}.{m.name}" for m in node.body if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)
            }
    return names


def resolve(name: str) -> Path:
    return REPO / name if (REPO / name).is_file() else REPO / "miniserve" / name


def test_every_hop_names_a_function_that_exists():
    text = DOC.read_text()
    hops = HOP.findall(text)
    assert len(hops) > 40
    missing = [f"{f}:{name}" for f, name in hops if not resolve(f).is_file() or name not in definitions(resolve(f))]
    assert not missing, missing


def test_every_file_it_names_exists():
    text = DOC.read_text()
    names = set(FILE.findall(text)) | {f for f, _ in HOP.findall(text)}
    # the table names spec_decode's files once after their package: `greedy_round.py` etc.
    missing = [n for n in names if not resolve(n).is_file() and not (REPO / "miniserve/spec_decode" / n).is_file()]
    assert not missing, missing
