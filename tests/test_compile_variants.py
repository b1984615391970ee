"""Triton compiles a kernel once per specialization of its integer arguments (== 1, divisible by 16, other). An
argument that changes every step (a token count, the block table's width) would compile a new variant the first
time each class shows up in serving: stalls of the whole engine in the middle of traffic (the first burst after
start-up, before and after: benchmarks/results/first_steps_h200.json). Those arguments are not specialized.

The check reads the compiled (not interpreted) kernels' settings, so it imports them without TRITON_INTERPRET."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]

PER_STEP_ARGS = {
    "miniserve.kernels.cache_write:_reshape_and_cache_kernel": ["num_tokens"],
    "miniserve.kernels.extend_attention:_extend_kernel": ["stride_bt"],
    "miniserve.kernels.decode_attention:_decode_split_kernel": ["stride_bt"],
    "miniserve.kernels.uniform_metadata:_uniform_metadata_kernel": ["stride_bt", "stride_tt", "num_blocks_per_seq"],
}

PROBE = """
import importlib, json, sys
out = {}
for name in json.loads(sys.argv[1]):
    module, fn = name.split(":")
    k = getattr(importlib.import_module(module), fn)
    out[name] = {"args": list(k.arg_names), "not_specialized": [
        k.arg_names[a] if isinstance(a, int) else a for a in (k.do_not_specialize or [])]}
print(json.dumps(out))
"""


def test_arguments_that_change_every_step_are_not_specialized():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(PER_STEP_ARGS))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, args in PER_STEP_ARGS.items():
        assert set(args) <= set(kernels[name]["args"]), (name, kernels[name]["args"])  # the names still exist
        assert set(args) <= set(kernels[name]["not_specialized"]), (name, kernels[name])
