"""A CPU install has no Triton (it is a test extra): the engine, the server and the CLI must not need it there."""

from __future__ import annotations

import subprocess
import sys

# Runs in a fresh interpreter where `import triton` fails, as in a venv made by the README's server command.
NO_TRITON = """
import os, sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
os.environ.pop("TRITON_INTERPRET", None)
from miniserve import LLM, SamplingParams
from miniserve.kernels.backend import resolve_backend
import miniserve.cli, miniserve.server.app  # noqa: F401

llm = LLM(kv_cache_dtype="fp8", speculative_model="demo", num_speculative_tokens=2)
out = llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
assert len(out.token_ids) == 12, out
os.environ["TRITON_INTERPRET"] = "1"
try:
    resolve_backend("cpu", "triton")
except ValueError as e:
    print("ERROR:", e)
print("OK")
"""


def test_engine_serves_fp8_and_speculation_on_cpu_without_triton():
    proc = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: the Triton kernels need the `triton` package" in proc.stdout
    assert proc.stdout.rstrip().endswith("OK")
