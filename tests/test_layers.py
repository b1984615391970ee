"""The shape of the tree (docs/ARCHITECTURE.md): imports only point down the layers and form no cycle; no class
is over 250 lines and no function over 60 (Triton kernels aside; their launchers count)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "miniserve"

# the most specific prefix wins; a module may import its own layer or a lower one
LAYERS = [
    ("miniserve.__init__", 7),
    ("miniserve.server", 6),
    ("miniserve.cli", 6),
    ("miniserve.__main__", 6),
    ("miniserve.llm", 6),
    ("miniserve.engine.llm_engine", 5),
    ("miniserve.spec_decode", 4),
    ("miniserve.distributed", 4),
    ("miniserve.engine", 3),
    ("miniserve.scheduler", 2),
    ("miniserve.models", 2),
    ("miniserve.kernels", 1),
    ("miniserve.config", 0),
    ("miniserve.settings", 0),
    ("miniserve.sampling_params", 0),
    ("miniserve.beam_search", 0),  # (drives generation through the callable LLM hands it)
    ("miniserve.tokenizer", 0),
    ("miniserve.chat_template", 0),
    ("miniserve.detokenizer", 0),
    ("miniserve.json_file", 0),
    ("miniserve.vllm_no_ops", 0),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)


def layer(module: str) -> int:
    matches = [(len(p), rank) for p, rank in LAYERS if module == p or module.startswith(p + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def imports() -> dict[str, set[str]]:
    """Every miniserve module -> the miniserve modules it imports (anywhere in the file, lazy ones included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("miniserve"):
                for alias in node.names:  # `from miniserve.engine import capacity` imports a module
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("miniserve")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_imports_point_down_the_layers():
    wrong = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in imports().items()
        for b in targets
        if layer(b) > layer(a)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = imports()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def _is_triton_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    # @triton.jit, or @triton.jit(do_not_specialize=...)
    return any(ast.unparse(d.func if isinstance(d, ast.Call) else d).endswith("jit") for d in node.decorator_list)


def test_classes_and_functions_stay_small():
    too_big = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and lines > 250:
                too_big.append(f"class {path.name}:{node.name} has {lines} lines")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and lines > 60 and not _is_triton_kernel(node):
                too_big.append(f"function {path.name}:{node.name} has {lines} lines")
    assert not too_big, "\n".join(too_big)
