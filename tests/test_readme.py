"""The README's offline and command-line examples run as written (on the embedded demo model, CPU)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def text_block_after(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    return re.search(r"```text\n(.*?)```", text[text.index(marker) :], flags=re.S).group(1)


def greedy_blocks() -> list[str]:
    """The ```text blocks of what the demo target writes greedily (80 new tokens), prompt first."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("What the target writes greedily") : text.index("It is a 7M-parameter model")]
    return re.findall(r"```text\n(.*?)\n```", section, flags=re.S)


def test_offline_example_prints_what_the_readme_shows():
    code = next(b for b in blocks("python") if "from miniserve import LLM" in b)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text_block_after("On the CPU it prints")


def test_greedy_text_in_the_readme_is_what_the_demo_target_writes():
    """miniserve (CPU, float32) and transformers both write exactly the README's blocks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miniserve import LLM, SamplingParams
    from miniserve.config import DEMO_TARGET

    shown = greedy_blocks()
    assert len(shown) == 2
    prompts = [b.splitlines()[0] for b in shown]
    outs = LLM().generate(prompts, SamplingParams(temperature=0, max_tokens=80), use_tqdm=False)
    assert [p + o.outputs[0].text for p, o in zip(prompts, outs)] == shown
    tok = AutoTokenizer.from_pretrained(DEMO_TARGET)
    model = AutoModelForCausalLM.from_pretrained(DEMO_TARGET, dtype=torch.float32).eval()
    for prompt, block in zip(prompts, shown):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=80)
        assert prompt + tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == block


def test_cli_generate_example_writes_the_readme_greedy_text():
    line = next(
        ln.split("#")[0].strip()
        for b in blocks("bash")
        for ln in b.splitlines()
        if ln.startswith("miniserve generate --prompt")
    )
    args = line.split(None, 2)[2]  # after "miniserve generate"
    assert args.startswith('--prompt "ROMEO:" --max-tokens 64')
    proc = subprocess.run(
        f"{sys.executable} -m miniserve.cli generate {args}", shell=True, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.removesuffix("\n")
    romeo = next(b for b in greedy_blocks() if b.startswith("ROMEO:"))
    assert len(text) > 100 and romeo.startswith("ROMEO:" + text)  # 64 of the block's 80 greedy tokens


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


def load_ci_readme():
    """.ci/readme.py, the extractor .ci/run uses (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("ci_readme", README.parent / ".ci" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_extracts_the_two_quick_start_commands_exactly():
    ci = load_ci_readme()
    server, test = ci.readme_command("server"), ci.readme_command("test")
    text = README.read_text(encoding="utf-8")
    quick_start = text[text.index("## Quick start") : text.index("## Offline use")]
    assert f"```bash\n{server}\n```" in quick_start and f"```bash\n{test}\n```" in quick_start
    # where .ci/run waits, with the protocol that enforces the connection settings
    assert server.endswith(f"uvicorn server:app --http server:http --host {ci.HOST} --port {ci.PORT}")
    assert test.endswith("python3 -m pytest -q -n auto --maxprocesses 4 tests")
    # the test command comes after the curl example, not between the server and "from another shell"
    assert quick_start.index(server) < quick_start.index("from another shell") < quick_start.index(test)
    twice = text.replace("<!-- ci: test command", "<!-- ci: server command")
    with pytest.raises(SystemExit, match="exactly one"):
        ci.readme_command("server", twice)
    two_lines = text.replace(f"{server}\n```", f"{server}\necho hi\n```")
    with pytest.raises(SystemExit, match="exactly one line"):
        ci.readme_command("server", two_lines)


def test_cli_prefix_caching_flag_and_hit_rate_line():
    def generate(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "miniserve.cli", "generate", "--prompt", "To be, or not to be, that is the"]
        cmd += ["--max-tokens", "8", "--n", "3", "--block-size", "4", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    cached, plain = generate(), generate("--no-enable-prefix-caching")
    assert cached.returncode == 0 and plain.returncode == 0, cached.stderr + plain.stderr
    assert cached.stdout == plain.stdout  # the 3 greedy choices: the same text either way
    hit_rate = re.search(r"\[prefix cache\] hit rate ([\d.]+)% \((\d+) of (\d+) tokens\)", cached.stderr)
    assert hit_rate and int(hit_rate.group(2)) > 0  # choices 1 and 2 found choice 0's prompt blocks
    assert "prefix cache" not in plain.stderr


def test_cli_generate_takes_unset_flags_from_the_models_generation_config(tmp_path):
    """generate's sampling flags left unset take generation_config.json's values (max_new_tokens 3 here), given
    ones win, and --generation-config vllm ignores the file (generate's own default: 64 tokens)."""
    import shutil

    from miniserve.config import DEMO_TARGET
    from miniserve.tokenizer import Tokenizer

    tuned = shutil.copytree(DEMO_TARGET, tmp_path / "tuned")
    (tuned / "generation_config.json").write_text('{"max_new_tokens": 3, "temperature": 0.0}')
    tok = Tokenizer.from_pretrained(tuned)

    def tokens(*extra: str) -> int:
        cmd = [sys.executable, "-m", "miniserve.cli", "generate", "--model", str(tuned), "--prompt", "ROMEO:"]
        out = subprocess.run([*cmd, "--ignore-eos", *extra], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return len(tok.encode(out.stdout.rstrip("\n"), add_special_tokens=False))

    assert tokens() <= 4 < tokens("--max-tokens", "12") and tokens("--generation-config", "vllm") > 12


def test_an_infinite_kv_budget_is_a_setting_error():
    from miniserve.config import EngineConfig, SettingError

    with pytest.raises(SettingError, match="finite"):
        EngineConfig(kv_cache_memory_gb=float("inf"))


def test_cli_bad_device_is_one_line_and_a_closed_pipe_is_not_an_error():
    cmd = [sys.executable, "-m", "miniserve.cli", "generate", "--prompt", "ROMEO:"]
    for device in ("bogus", "meta"):
        out = subprocess.run([*cmd, "--device", device], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr and "device" in out.stderr, out.stderr
    head = subprocess.run(f"{shlex.join(cmd)} --max-tokens 200 --ignore-eos | head -c 1", shell=True,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "BrokenPipeError" not in head.stderr and "Traceback" not in head.stderr, head.stderr
