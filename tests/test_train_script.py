"""scripts/train_demo_models.py runs end to end (tiny settings, CPU): a full run, then --draft-only on its output."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import CORPUS, REPO
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from miniserve.config import DEMO_TARGET

SCRIPT = REPO / "scripts" / "train_demo_models.py"
TINY = [
    "--device", "cpu", "--corpus", str(CORPUS), "--tokenizer", str(DEMO_TARGET / "tokenizer.model"),
    "--steps", "2", "--draft-steps", "2", "--batch-size", "2", "--seq-len", "40", "--trials", "0.1:0",
    "--kd-samples", "2", "--max-eval-tokens", "300", "--spec-prompts", "1", "--eval-window", "64",
    "--sample-chars", "500", "--eval-every", "1",
]  # fmt: skip


def run(*args: str) -> None:
    subprocess.run([sys.executable, str(SCRIPT), *TINY, *args], check=True, capture_output=True, timeout=300)


def test_full_run_then_draft_only_keeps_the_target(tmp_path):
    run("--out", str(tmp_path))
    target, draft = tmp_path / "shakespeare-target", tmp_path / "shakespeare-draft"
    target_weights = load_file(target / "model.safetensors")
    run("--out", str(tmp_path), "--draft-only", "--draft-layers", "1", "--draft-hidden", "64")

    assert all(torch.equal(v, load_file(target / "model.safetensors")[k]) for k, v in target_weights.items())
    model = AutoModelForCausalLM.from_pretrained(draft)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (1, 64)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["params"]["draft"] == sum(p.numel() for p in model.parameters())
    assert metrics["training"]["draft"]["shape"]["num_hidden_layers"] == 1
    assert metrics["training"]["target_trials"]  # the target's training record survives a draft-only run
