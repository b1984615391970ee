"""Tensor parallelism on the CPU: two ranks over gloo, each a real process, against the single-process engine.

The oracle everywhere is the same engine at tensor_parallel_size=1 (itself checked against transformers in
test_engine_parity.py): the split model must give the same logits (to fp32 rounding: the row-parallel
all-reduces add the partial sums in another order), the same greedy tokens and, in an FP8 pool, the same KV bytes
on each rank as the matching heads of the single pool. The sharded loading is checked against the checkpoint's
own tensors.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from miniserve import LLM, SamplingParams
from miniserve.distributed.launch import TensorParallelError
from miniserve.engine.model_runner import ForwardInput
from miniserve.models.config import ModelConfig
from miniserve.models.loader import load_model
from miniserve.models.parallel import ShardLayout, TensorParallel
from tests.conftest import ARCHS, build_model_dir

REPO = Path(__file__).resolve().parents[1]
KW = dict(dtype="float32", device="cpu", max_num_seqs=8)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
GREEDY_8 = SamplingParams(temperature=0, max_tokens=8)  # what the server tests ask for
ONE_KV_HEAD = dict(num_key_value_heads=1, vocab_size=383, tie_word_embeddings=True)  # replication; padded vocab


@pytest.fixture(autouse=True)
def hang_guard():
    """A collective that one rank never joins blocks the others for good: fail the run loudly instead (the ranks
    this process spawned follow it)."""
    import faulthandler

    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def prompts(vocab: int, n: int = 3, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for length in (5, 19, 2)[:n]]


@pytest.fixture(scope="module")
def one_kv_head_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Each architecture with 1 KV head for 2 ranks (replicated), a vocabulary that 2 does not divide and tied
    embeddings (a vocab-parallel LM head that is the embedding)."""
    return {
        arch: build_model_dir(tmp_path_factory.mktemp(f"{arch}-1kv"), arch, tokenizer_dir, seed=10 + i, **ONE_KV_HEAD)
        for i, arch in enumerate(ARCHS)
    }


def greedy_and_logits(llm: LLM, batch: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of the batch through the engine, then the logits of every position of each prompt plus its
    greedy continuation, from one prefill per sequence driven by hand through the target."""
    tokens = [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]
    eng = llm.engine
    logits = []
    for prompt, out in zip(batch, tokens):
        seq = prompt + out
        table = list(range(eng.block_manager.blocks_for(len(seq))))
        logits.append(eng.target.forward([ForwardInput(seq, 0, table, len(seq))]))
    return tokens, logits


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_equal_one(model_dirs, one_kv_head_dirs, arch, kv_heads):
    path = model_dirs[arch] if kv_heads == 2 else one_kv_head_dirs[arch]
    vocab = ModelConfig.from_dir(path).vocab_size
    batch = prompts(vocab)
    want_tokens, want_logits = greedy_and_logits(LLM(str(path), **KW), batch)
    llm = LLM(str(path), tensor_parallel_size=2, **KW)
    try:
        assert llm.engine.target.num_kv_heads == 1  # 2 heads split, or 1 head on both ranks
        tokens, logits = greedy_and_logits(llm, batch)
        assert llm.engine.decoder.num_overlapped_steps > 0  # decode steps sent their tokens from rank 0's device
    finally:
        llm.shutdown()
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert got.shape == want.shape == (want.shape[0], vocab)
        assert (got - want).abs().max().item() <= 1e-5


def test_each_rank_reads_and_holds_only_its_shard(model_dirs, one_kv_head_dirs, monkeypatch):
    """Rank r's parameters are its rows/columns of the checkpoint's tensors (compared with the file itself), their
    counts add up to the model's (replicated KV heads and norms once per rank), and the loader reads from the file
    no element that the rank does not keep."""
    import miniserve.models.loader as loader

    read: list[int] = []  # elements of each tensor read from a file
    monkeypatch.setattr(loader, "safe_open", lambda *a, **kw: _RecordingFile(safe_open(*a, **kw), read))
    for path in (model_dirs["Qwen2ForCausalLM"], one_kv_head_dirs["Qwen3ForCausalLM"]):
        cfg = ModelConfig.from_dir(path)
        full = load_file(path / "model.safetensors")
        shards = []
        for rank in (0, 1):
            read.clear()
            model, _ = load_model(path, cfg, torch.float32, torch.device("cpu"), "torch", 64, TensorParallel(rank, 2))
            shards.append(model)
            params = dict(model.named_parameters())
            held = sum(p.numel() for p in params.values())
            padding = (model.shard.vocab_rows - model.shard.vocab_real) * cfg.hidden_size
            assert sum(read) == held - padding  # nothing beyond the shard left the file
            check_shard_against_checkpoint(model, full, cfg, rank)
        total = sum(t.numel() for t in full.values())
        replicated = sum(t.numel() for n, t in full.items() if "norm" in n)
        if cfg.num_kv_heads == 1:  # k and v projections (and their biases) on both ranks
            replicated += sum(t.numel() for n, t in full.items() if "k_proj" in n or "v_proj" in n)
        padding = sum(m.shard.vocab_rows - m.shard.vocab_real for m in shards) * cfg.hidden_size
        held = sum(p.numel() for m in shards for p in m.parameters())
        assert held == total + replicated + padding


class _RecordingFile:
    """A safetensors file that counts the elements each slice read returns."""

    def __init__(self, f, read: list[int]):
        self.f, self.read = f, read

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        tensor = self.f.get_tensor(name)
        self.read.append(tensor.numel())
        return tensor

    def get_slice(self, name):
        return _RecordingSlice(self.f.get_slice(name), self.read)


class _RecordingSlice:
    def __init__(self, s, read):
        self.s, self.read = s, read

    def get_shape(self):
        return self.s.get_shape()

    def get_dtype(self):
        return self.s.get_dtype()

    def __getitem__(self, index):
        tensor = self.s[index]
        self.read.append(tensor.numel())
        return tensor


def check_shard_against_checkpoint(model, full: dict[str, torch.Tensor], cfg: ModelConfig, rank: int) -> None:
    """The Megatron split written out by hand: heads, intermediate slice and vocabulary rows of rank `rank`."""
    hd, heads, kv = cfg.head_dim, cfg.num_heads // 2, max(1, cfg.num_kv_heads // 2)
    kv_start = rank * kv if cfg.num_kv_heads >= 2 else 0
    inter = cfg.intermediate_size // 2
    vrows = -(-cfg.vocab_size // 2)
    embed = full["model.embed_tokens.weight"][rank * vrows : (rank + 1) * vrows]
    assert torch.equal(model.embed_tokens[: embed.shape[0]], embed)
    assert not model.embed_tokens[embed.shape[0] :].any()  # zero padding rows
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q_rows = slice(rank * heads * hd, (rank + 1) * heads * hd)
        kv_rows = slice(kv_start * hd, (kv_start + kv) * hd)
        qkv = torch.cat(
            [full[p + "self_attn.q_proj.weight"][q_rows]]
            + [full[p + f"self_attn.{n}_proj.weight"][kv_rows] for n in "kv"]
        )
        assert torch.equal(layer.self_attn.qkv_weight, qkv)
        assert torch.equal(layer.self_attn.o_weight, full[p + "self_attn.o_proj.weight"][:, q_rows])
        i_rows = slice(rank * inter, (rank + 1) * inter)
        gate_up = torch.cat([full[p + "mlp.gate_proj.weight"][i_rows], full[p + "mlp.up_proj.weight"][i_rows]])
        assert torch.equal(layer.mlp.gate_up_weight, gate_up)
        assert torch.equal(layer.mlp.down_weight, full[p + "mlp.down_proj.weight"][:, i_rows])


def test_shard_layout_replicates_kv_heads_and_rejects_bad_splits(model_dirs):
    cfg = ModelConfig.from_dir(model_dirs["LlamaForCausalLM"])  # 4 query heads, 2 KV heads
    cfg.num_kv_heads = 1
    layouts = [ShardLayout.of(cfg, r, 4) for r in range(4)]
    assert [(s.q_head_start, s.num_heads, s.kv_head_start, s.num_kv_heads) for s in layouts] == [
        (0, 1, 0, 1),
        (1, 1, 0, 1),
        (2, 1, 0, 1),
        (3, 1, 0, 1),
    ]
    cfg.num_kv_heads = 2
    assert [ShardLayout.of(cfg, r, 4).kv_head_start for r in range(4)] == [0, 0, 1, 1]  # query heads 0-1 -> kv 0
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        LLM(str(model_dirs["LlamaForCausalLM"]), tensor_parallel_size=3, **KW)  # before any process starts


def with_kv_scales(src: Path, dst: Path, scales: dict[int, tuple[float, float]]) -> Path:
    """A copy of the checkpoint with per-layer FP8 KV scales, as vLLM/llm-compressor checkpoints store them."""
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for layer, (k, v) in scales.items():
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(k)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(v)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_fp8_pools_equal_the_matching_heads_of_one_pool(tmp_path, model_dirs, one_kv_head_dirs, kv_heads):
    src = (model_dirs if kv_heads == 2 else one_kv_head_dirs)["LlamaForCausalLM"]
    path = with_kv_scales(src, tmp_path / "fp8", {0: (0.05, 0.02), 1: (0.03, 0.04)})
    kw = dict(KW, kv_cache_dtype="fp8", num_kv_blocks=16)
    batch = prompts(ModelConfig.from_dir(path).vocab_size)
    single = LLM(str(path), **kw)
    single.generate(batch, GREEDY, use_tqdm=False)
    want = single.engine.target.kv_pool
    llm = LLM(str(path), tensor_parallel_size=2, **kw)
    try:
        llm.generate(batch, GREEDY, use_tqdm=False)
        pools = llm.engine.target.gather_kv_pools()
        scales = [(kv.k_scale.item(), kv.v_scale.item()) for kv in llm.engine.target.kv]
    finally:
        llm.shutdown()
    fp32 = [tuple(torch.tensor(s).item() for s in pair) for pair in [(0.05, 0.02), (0.03, 0.04)]]
    assert scales == fp32  # rank 1's scales: its bytes below (another scale gives other bytes)
    assert want.dtype == torch.float8_e4m3fn and want.view(torch.uint8).any()
    for rank, pool in enumerate(pools):
        head = rank if kv_heads == 2 else 0
        expected = want[:, :, :, :, head : head + 1].contiguous()
        assert pool.dtype == want.dtype and pool.shape == expected.shape
        # layer 0's K/V come from the same inputs on every rank: the same bytes, exactly
        assert torch.equal(pool[0].view(torch.uint8), expected[0].view(torch.uint8))
        # later layers see a residual stream whose all-reduced sums were added in another order (one fp32 ulp):
        # a value that lands on an FP8 rounding boundary may round to the neighbouring code, nothing more
        got, ref = pool[1:].float(), expected[1:].float()
        moved = got != ref
        assert moved.sum().item() <= max(1, moved.numel() // 1000)
        assert ((got - ref).abs() <= ref.abs().clamp_min(2.0**-9) / 8)[moved].all()


def small_control_buffer() -> None:
    """WORKER_SETUP: a 16-word control buffer, so that most messages need the overflow broadcast."""
    import miniserve.distributed.channel as channel

    channel.CAPACITY = 16


def test_speculative_decoding_with_a_split_target(monkeypatch, llama_dir, draft_dir):
    """The draft runs whole on rank 0; the verification of its tokens runs on both ranks (a device broadcast for
    greedy rounds, a packed forward for sampled ones). Tokens equal the single-process engine's. (The control
    messages travel in a 16-word buffer here, most of them in two broadcasts.)"""
    import miniserve.distributed.channel as channel
    import miniserve.distributed.launch as launch

    monkeypatch.setattr(launch, "WORKER_SETUP", small_control_buffer)
    monkeypatch.setattr(channel, "CAPACITY", 16)
    kw = dict(KW, speculative_model=str(draft_dir), num_speculative_tokens=3)
    batch = prompts(384)
    sampled = SamplingParams(temperature=0.9, seed=5, max_tokens=12, ignore_eos=True)
    single = LLM(str(llama_dir), **kw)
    want = [[o.outputs[0].token_ids for o in single.generate(batch, p, use_tqdm=False)] for p in (GREEDY, sampled)]
    llm = LLM(str(llama_dir), tensor_parallel_size=2, **kw)
    try:
        got = [[o.outputs[0].token_ids for o in llm.generate(batch, p, use_tqdm=False)] for p in (GREEDY, sampled)]
        assert llm.engine.stats()["spec_num_drafts"] > 0
    finally:
        llm.shutdown()
    assert got == want


def stand_in_graphs() -> None:
    """WORKER_SETUP of the graph test: the eager stand-in for CUDA graph capture, in every rank."""
    from miniserve.engine.cuda_graphs import BucketedGraphs
    from tests.test_graph_inputs import eager_capture

    BucketedGraphs._capture = eager_capture


@pytest.mark.parametrize("draft", [False, True])
def test_replayed_passes_run_on_every_rank(monkeypatch, llama_dir, draft_dir, draft):
    """With graphs (the eager stand-in of test_graph_inputs.py, in both ranks), rank 0's decision to replay
    padded batch buckets reaches the other rank, whose passes then have the same shapes: same tokens as eager.
    Without a draft, decode steps replay from the previous step's samples on rank 0's device; with one, the greedy
    round's graph holds the verification."""
    import miniserve.distributed.launch as launch
    from miniserve.engine.cuda_graphs import BucketedGraphs
    from tests.test_graph_inputs import eager_capture, engine_with_stand_in_graphs

    monkeypatch.setattr(launch, "WORKER_SETUP", stand_in_graphs)
    monkeypatch.setattr(BucketedGraphs, "_capture", eager_capture)
    kw = dict(KW, speculative_model=str(draft_dir), num_speculative_tokens=2) if draft else KW
    batch = prompts(384, n=3, seed=4)  # 3 sequences: padded to the bucket of 4
    want = [o.outputs[0].token_ids for o in LLM(str(llama_dir), **kw).generate(batch, GREEDY, use_tqdm=False)]
    llm = LLM(str(llama_dir), tensor_parallel_size=2, **kw)
    try:
        eng = engine_with_stand_in_graphs(llm)
        assert eng.target.graphs and (not draft or eng.decoder.greedy.graphs is not None)
        got = [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]
        assert draft or eng.decoder.num_overlapped_steps > 0
    finally:
        llm.shutdown()
    assert got == want


# ---------------------------------------------------------------------------------------------- processes


def spawned(pids: list[int]) -> list[int]:
    """The processes started by multiprocessing's spawn (not its resource tracker)."""
    return [p for p in pids if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]


def children_of(pid: int, deep: bool = True) -> list[int]:
    """Every descendant process of `pid` (Linux /proc); with deep=False, its children only."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids + [k for kid in kids for k in children_of(kid)] if deep else kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_a_dead_rank_stops_the_engine_with_a_clear_error(llama_dir):
    llm = LLM(str(llama_dir), tensor_parallel_size=2, **KW)
    try:
        (rank1,) = llm.engine.target.state.spawned.procs.values()
        os.kill(rank1.pid, signal.SIGKILL)
        assert wait_gone([rank1.pid]) == []
        with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) exited with code -9"):
            llm.generate(prompts(384), GREEDY, use_tqdm=False)
        with pytest.raises(TensorParallelError, match="rank 1"):  # and every later call, at once
            llm.generate(prompts(384), GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


def test_a_dead_rank_0_takes_the_other_ranks_with_it(llama_dir):
    """No orphans: killing rank 0 (no chance to clean up) ends the rank it spawned."""
    code = (
        "import sys, time\n"
        "from miniserve import LLM\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({str(llama_dir)!r}, tensor_parallel_size=2, dtype='float32', device='cpu')\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(300)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        ranks = children_of(proc.pid)
        assert ranks
        proc.kill()
        proc.wait(10)
        assert wait_gone(ranks) == []
    finally:
        proc.kill()


def test_a_script_without_a_main_guard_is_told_why_its_rank_died(llama_dir, tmp_path):
    """Each rank is a spawned process that imports the main script again: one that builds its LLM at the top level
    loses its ranks before they start, and the error says what to add (it said only "exited with code 1")."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from miniserve import LLM\n"
        f"llm = LLM({str(llama_dir)!r}, tensor_parallel_size=2, dtype='float32', device='cpu')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()[-1]  # (the rank's own traceback, above it, is easy to miss)
    assert error.startswith("miniserve.distributed.launch.TensorParallelError: tensor-parallel rank 1"), error
    assert 'needs an `if __name__ == "__main__":` guard' in error, error


def server_env(model_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "MINISERVE_MODEL": str(model_dir),
        "MINISERVE_DEVICE": "cpu",
        "MINISERVE_DTYPE": "float32",
        **extra,
    }


def serve_one_completion(cmd: list[str], env: dict[str, str], port: int, log) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "the server exited during startup"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    body = {"prompt": [5, 9, 23], "max_tokens": 8, "temperature": 0}
    return proc, httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()


@pytest.mark.parametrize("how", ["uvicorn+SIGTERM", "cli+Ctrl-C", "rank 1 killed"])
def test_server_with_two_ranks_serves_then_stops_cleanly(llama_dir, tmp_path, how):
    """`uvicorn server:app` (MINISERVE_TENSOR_PARALLEL_SIZE=2) stopped by SIGTERM, `miniserve serve
    --tensor-parallel-size 2` stopped by Ctrl-C (SIGINT to the terminal's whole process group), and a server whose
    rank 1 is killed: its engine (rank 0) stops saying why, and the server stops as on SIGTERM and exits with
    status 1 (a supervisor restarts it; vLLM's stops too). Each serves the completion of one rank first, and ends
    with a complete shutdown (uvicorn re-raises the signal once it is done) and no process left."""
    from tests.test_server import free_port

    port = free_port()
    if how == "cli+Ctrl-C":
        cmd = [sys.executable, "-m", "miniserve.cli", "serve", "--port", str(port), "--model", str(llama_dir)]
        cmd += ["--tensor-parallel-size", "2", "--device", "cpu", "--dtype", "float32"]
        env = server_env(llama_dir)
    else:
        cmd = [sys.executable, "-m", "uvicorn", "server:app", "--port", str(port)]
        env = server_env(llama_dir, MINISERVE_TENSOR_PARALLEL_SIZE="2")
    want = LLM(str(llama_dir), **KW).generate([[5, 9, 23]], GREEDY_8, use_tqdm=False)[0].outputs[0]
    with open(tmp_path / "log", "w+") as log:
        proc, reply = serve_one_completion(cmd, env, port, log)
        try:
            ranks = children_of(proc.pid)
            assert ranks, "no rank process was started"
            if how == "uvicorn+SIGTERM":
                proc.send_signal(signal.SIGTERM)
            elif how == "cli+Ctrl-C":
                os.killpg(proc.pid, signal.SIGINT)
            else:  # the server's engine process is rank 0; rank 1 is its child
                engine = next(p for p in spawned(children_of(proc.pid, deep=False)))
                (rank1,) = spawned(children_of(engine, deep=False))
                os.kill(rank1, signal.SIGKILL)
                assert wait_gone([engine]) == []  # the engine stops: rank 0 cannot run without rank 1
            # uvicorn re-raises the signal it stopped on; uvicorn.run (the CLI) ends on the re-raised Ctrl-C
            assert proc.wait(60) == {"uvicorn+SIGTERM": -signal.SIGTERM, "cli+Ctrl-C": 0, "rank 1 killed": 1}[how]
            assert wait_gone(ranks) == []
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        output = log.read()
    # (a lost engine's server ends its shutdown with its own line and status, before uvicorn's last lines)
    done = "exiting with status 1: the engine process was lost" if how == "rank 1 killed" else "shutdown complete"
    assert done in output, output
    if how == "rank 1 killed":
        assert re.search(r"tensor-parallel rank 1 \(pid \d+\) exited with code -9", output), output
        assert "the engine process exited unexpectedly" in output, output
    else:
        assert "Traceback" not in output, output
    assert reply["usage"]["completion_tokens"] == len(want.token_ids)
    assert reply["choices"][0]["text"] == want.text


def test_torchrun_ranks_join_through_env(llama_dir):
    """torchrun-style start: both ranks run the same `miniserve generate` command with the env:// variables; rank 0
    prints the completion (the same as one rank's), rank 1 serves it and exits 0 silently."""
    from tests.test_server import free_port

    cmd = [sys.executable, "-m", "miniserve.cli", "generate", "--model", str(llama_dir), "--device", "cpu"]
    cmd += ["--dtype", "float32", "--prompt", "ROMEO:", "--max-tokens", "10", "--ignore-eos"]
    env = server_env(llama_dir)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    single = LLM(str(llama_dir), **KW).generate("ROMEO:", params, use_tqdm=False)[0].outputs[0].text
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            cmd + ["--tensor-parallel-size", "2"],
            cwd=REPO,
            env={**env, **rendezvous, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], [err for _, err in outs]
    assert outs[0][0] == single + "\n"
    assert outs[1][0] == ""


def test_forward_inputs_cross_the_channel_with_list_or_array_block_tables():
    """A decode step's block tables are numpy views (Sequence.block_array), a prompt chunk's lists: both reach the
    other ranks as the same ints."""
    import numpy as np

    from miniserve.distributed.channel import Op, decode_inputs, encode_inputs

    inputs = [ForwardInput([5], 7, np.array([3, 4, 9], dtype=np.int64), 1), ForwardInput([1, 2], 0, [8], 2)]
    words = encode_inputs(Op.FORWARD, inputs)
    assert words[0] == Op.FORWARD
    assert decode_inputs(words[1:]) == [ForwardInput([5], 7, [3, 4, 9], 1), ForwardInput([1, 2], 0, [8], 2)]
