"""Where a result came from. Every benchmark writes its JSON through `write_result`, which adds a `provenance`
record: the commit and whether the tree had uncommitted changes, the date, the command, and the versions and
device it ran on. scripts/render_results.py prints it beside every table, so a number is never separated from
the code that produced it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _versions() -> dict:
    """Installed versions (read from package metadata: nothing is imported for it)."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["cuda"] = torch.version.cuda
        versions["hip"] = torch.version.hip
    return versions


def _device() -> str:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def provenance() -> dict:
    """The record stored under "provenance" in every result file. A staged copy (the GPU box: an exported tree,
    possibly inside another checkout's .git) takes its commit and dirty flag from MINISERVE_COMMIT and
    MINISERVE_DIRTY, which win over git when set."""
    commit = os.environ.get("MINISERVE_COMMIT")
    dirty: bool | None = os.environ.get("MINISERVE_DIRTY", "0").strip().lower() not in ("", "0", "false", "no")
    if not commit:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "versions": _versions(),
        "device": _device(),
    }


def flat() -> dict:
    """The same record as top-level fields (command, date, commit, dirty, versions, gpu), for results that keep
    their provenance beside their data (benchmarks/throughput.py)."""
    p = provenance()
    record = {k: p[k] for k in ("command", "date", "commit", "dirty")} | p.pop("versions")
    if not p["device"].startswith("cpu"):
        record["gpu"] = p["device"]
    return record


def write_result(path: str | Path, result: dict, measured_on: dict | None = None) -> Path:
    """Write `result` as JSON with its provenance first; returns the path. `measured_on` ("device", "versions"):
    where the numbers were measured, for a result that joins runs made elsewhere (the join's own commit and command
    stay)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = provenance() | (measured_on or {})
    path.write_text(json.dumps({"provenance": record, **result}, indent=1, default=str) + "\n")
    return path
