"""The README's offline and command-line examples run as written (on the embedded demo model, CPU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_offline_example_runs():
    code = next(b for b in blocks("python") if "from miniserve import LLM" in b)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ROMEO:" in proc.stdout and "length" in proc.stdout


def test_cli_generate_example_runs():
    line = next(
        ln.split("#")[0].strip()
        for b in blocks("bash")
        for ln in b.splitlines()
        if ln.startswith("miniserve generate --prompt")
    )
    args = line.split(None, 2)[2]  # after "miniserve generate"
    proc = subprocess.run(
        f"{sys.executable} -m miniserve.cli generate {args}", shell=True, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 20


def test_cli_reports_user_errors_clearly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "miniserve.cli", "generate", "--model", str(tmp_path / "nope"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "miniserve: error:" in proc.stderr and "nope" in proc.stderr


def test_cli_speculative_flags_speculate_and_keep_the_greedy_text():
    def generate(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "miniserve.cli", "generate", "--prompt", "ROMEO:", "--max-tokens", "24", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    plain = generate()
    spec = generate("--speculative-model", "demo", "--num-speculative-tokens", "3")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout  # greedy: speculation changes the speed, not the text
    assert "[speculative decoding] mean acceptance length" in spec.stderr
    assert "speculative" not in plain.stderr
