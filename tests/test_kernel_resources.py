"""benchmarks/kernel_resources.py: the occupancy model against Nsight Compute's figures, the SASS reading on a
hand-written listing, and one real offline compile for sm_90 where Triton's nvidia backend is installed (the
CPU wheels include it, with ptxas, cuobjdump and nvdisasm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import kernel_resources as kr

ROOT = Path(__file__).resolve().parents[1]


def test_occupancy_reproduces_the_h200_ncu_block_limits():
    """decode_attention_ncu_h200.txt: 203 registers x 4 warps -> 2 blocks (12.5%), 93 -> 5 blocks (31.25%)."""
    fp8 = kr.occupancy(203, 4, 40960)
    assert (fp8["blocks_per_sm"], fp8["limited_by"], fp8["occupancy"]) == (2, "registers", 0.125)
    bf16 = kr.occupancy(93, 4, 38912)
    assert (bf16["blocks_per_sm"], bf16["limited_by"], bf16["occupancy"]) == (5, "registers", 0.3125)
    assert kr.occupancy(32, 4, 200_000)["limited_by"] == "shared_memory"
    assert kr.occupancy(16, 32, 0)["blocks_per_sm"] == 2  # 64 warps per SM at most


def test_the_loop_is_found_and_counted():
    """The innermost loop with the most tensor-core instructions; predicates and modifiers are read off."""
    listing = [
        (0x00, "MOV R1, c[0x0][0x28]", 2),
        (0x10, ".L:.L_x_1", -1),
        (0x10, "LDS.U8 R2, [R3]", 9),
        (0x20, "HMMA.16816.F32 R4, R8, R12, R4", 40),
        (0x30, "@!P0 BRA `(.L_x_1)", 12),
        (0x40, ".L:.L_x_2", -1),
        (0x40, "IMAD R1, R2, R3, RZ", 3),
        (0x50, "@P1 BRA `(.L_x_2)", 3),  # a loop without MMA: not the KV loop
        (0x60, "EXIT", 0),
    ]
    loop = kr.main_loop(listing)
    assert [kr.mnemonic(t) for _, t, _ in loop] == ["LDS.U8", "HMMA.16816.F32", "BRA"]
    mix = kr.instruction_mix(loop)
    assert mix["total"] == 3 and mix["families"] == {"HMMA": 1, "LDS": 1}


@pytest.mark.skipif(kr.nvidia_tools() is None, reason="Triton's nvidia backend and its tools are not installed")
def test_compiles_decode_and_extend_for_sm90_offline(tmp_path):
    """One tiny sweep through the command line, in a process of its own: the test suite runs Triton in its
    interpreter (TRITON_INTERPRET=1), whose kernels cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "resources.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--shapes", "llama-3.2-1b"]
    cmd += ["--caches", "fp8-staged", "--block-n", "32", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["block_n"]) for r in rows] == [("decode", 32), ("extend", 32)]
    for r in rows:
        assert 0 < r["registers"] <= 255 and 0 < r["occupancy"] <= 1 and r["shared_bytes"] > 0
        mma = r["loop_families"].get("HMMA", 0) + r["loop_families"].get("HGMMA", 0)  # mma.sync / wgmma
        assert r["kv_mode"] == 3 and mma > 0 and r["loop_instructions"] > 0


@pytest.mark.skipif(kr.nvidia_tools() is None, reason="Triton's nvidia backend and its tools are not installed")
def test_extend_variants_compile_offline(tmp_path):
    """--variants: the split-diagonal extend kernel has two KV loops, the first (below the diagonal) without the
    causal select and shorter than the plain launch's one loop (the default launch splits too)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "resources.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--shapes", "llama-3.2-1b"]
    cmd += ["--caches", "bf16", "--extend-chunk", "256", "1024", "--variants", "plain", "diag", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain, diag = json.loads(out.read_text())["rows"]
    assert (plain["variant"], diag["variant"]) == ("plain", "diag")
    assert len(plain["mma_loops"]) == 1 and len(diag["mma_loops"]) == 2
    unmasked, diagonal = diag["mma_loops"]
    assert unmasked["fsel"] == 0 < diagonal["fsel"]
    assert unmasked["instructions"] < plain["mma_loops"][0]["instructions"]
