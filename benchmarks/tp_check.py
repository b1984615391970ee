"""Tensor parallelism on 2 GPUs (issue 17): correctness against one GPU, speed, and a served run.

    NCCL_NVLS_ENABLE=0 python benchmarks/tp_check.py --out $OUT/tp_check_h200x2.json
    python benchmarks/tp_check.py --device cpu --tiny --parts correctness fp8 server   # a CPU dry run (gloo)

Parts (`--parts`, all by default):
- `correctness`: greedy tokens at TP=2 against TP=1 on the demo model and on a random-weight Llama-3.2-1B shape, in
  fp32 (expected identical) and in bf16 (the all-reduces add in another order, so near-ties may flip: the first
  divergence of each sequence is reported); the largest logit difference of a prompt pass.
- `fp8`: with an FP8 KV pool, each rank's KV bytes against the matching heads of the TP=1 pool: layer 0 must be
  identical; later layers may differ by one code where the residual stream's different summation order moves a
  value across a rounding boundary (the count is reported).
- `spec`: speculative decoding (the demo pair, the draft whole on rank 0) at TP=2 against TP=1: same greedy
  tokens and acceptance; the decode rate of each.
- `speed`: benchmarks/throughput.py on the Llama-3.1-8B shape at TP=1 and TP=2: batch 1 decode (target >= 1.6x)
  and batch 64 `fixed` (target >= 1.7x), plus a profile of TP=2 decode steps on rank 0 with the all-reduce share.
- `server`: `uvicorn server:app` with MINISERVE_TENSOR_PARALLEL_SIZE=2 serves 64 concurrent streams, stops on
  SIGTERM, and leaves no process behind (none of its children, nothing on the GPUs per nvidia-smi).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.checkpoints import build_checkpoint  # noqa: E402
from benchmarks.provenance import write_result  # noqa: E402
from miniserve import LLM, SamplingParams  # noqa: E402
from miniserve.config import DEMO_TARGET  # noqa: E402
from miniserve.engine.model_runner import ForwardInput  # noqa: E402

TINY = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "vocab_size": 1000}


def prompts(vocab: int, n: int = 8, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 33, 128, 5, 300, 64, 17, 200][:n]
    return [torch.randint(3, min(vocab, 10000), (k,), generator=g).tolist() for k in lengths]


def engine_kw(args, dtype: str, **extra) -> dict:
    kw = dict(dtype=dtype, max_model_len=1024, kv_cache_memory_gb=2.0, max_num_seqs=64, **extra)
    if args.device:
        kw["device"] = args.device
    return kw


def run(model: Path, tp: int, kw: dict, batch, gen: int):
    """Greedy tokens of `batch`, the logits of one prompt pass, and (fp8) every rank's KV pool."""
    llm = LLM(str(model), tensor_parallel_size=tp, **kw)
    try:
        params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
        tokens = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
        eng = llm.engine
        pools = None
        if "fp8" in kw.get("kv_cache_dtype", ""):
            pools = eng.target.gather_kv_pools() if tp > 1 else [eng.target.kv_pool.clone()]
        seq = batch[1]
        table = list(range(eng.block_manager.blocks_for(len(seq))))
        logits = eng.target.forward([ForwardInput(seq, 0, table, len(seq))]).cpu()
        return tokens, logits, pools
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def first_divergence(a: list[list[int]], b: list[list[int]]) -> dict:
    first = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), None) for s, t in zip(a, b)]
    return {"identical": a == b, "identical_sequences": sum(f is None for f in first), "first_divergence": first}


def models(args) -> dict[str, Path]:
    overrides = TINY if args.tiny else None
    return {"demo": DEMO_TARGET, "llama-3.2-1b": build_checkpoint("llama-3.2-1b", args.ckpt_root, overrides=overrides)}


def check_correctness(args) -> dict:
    out = {}
    for name, path in models(args).items():
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        batch = prompts(vocab)
        for dtype in ("float32", "bfloat16"):
            kw = engine_kw(args, dtype)
            t1, l1, _ = run(path, 1, kw, batch, args.gen)
            t2, l2, _ = run(path, 2, kw, batch, args.gen)
            out[f"{name}/{dtype}"] = {
                **first_divergence(t1, t2),
                "max_abs_logit_diff": (l1.float() - l2.float()).abs().max().item(),
            }
            print(name, dtype, json.dumps(out[f"{name}/{dtype}"]), flush=True)
    out["fp32_identical"] = all(v["identical"] for k, v in out.items() if k.endswith("float32"))
    return out


def check_fp8(args) -> dict:
    path = models(args)["llama-3.2-1b"]
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    kw = engine_kw(args, "float32", kv_cache_dtype="fp8", num_kv_blocks=128)
    batch = prompts(vocab, n=4)
    _, _, (single,) = run(path, 1, kw, batch, 32)
    _, _, pools = run(path, 2, kw, batch, 32)
    per_rank = []
    heads = single.shape[4]
    for rank, pool in enumerate(pools):
        local = pool.shape[4]
        start = rank * local if heads >= len(pools) else rank // (len(pools) // heads)
        want = single[:, :, :, :, start : start + local].contiguous().cpu()
        got = pool.cpu()
        diff = got.view(torch.uint8) != want.view(torch.uint8)
        per_rank.append(
            {
                "layer0_identical": not diff[0].any().item(),
                "bytes_differing_later_layers": int(diff[1:].sum()),
                "bytes": diff.numel(),
            }
        )
    result = {"ranks": per_rank, "layer0_identical": all(r["layer0_identical"] for r in per_rank)}
    print("fp8", json.dumps(result), flush=True)
    return result


def throughput(args, tp: int, workload: list[str], tag: str) -> dict:
    out = Path(args.out_dir) / f"throughput_{tag}_tp{tp}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--shape", args.speed_shape]
    cmd += ["--ckpt-root", args.ckpt_root, "--tensor-parallel-size", str(tp), "--out", str(out), *workload]
    if args.device:
        cmd += ["--device", args.device]
    if args.tiny:
        cmd += ["--overrides", json.dumps(TINY), "--repeats", "1"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return {"command": " ".join(cmd), **json.loads(out.read_text())}


def check_spec(args) -> dict:
    """Speculative decoding with a split target (the draft whole on rank 0): the demo pair, greedy, at TP=1 and
    TP=2: the same tokens, the same acceptance, and the decode rate of each (the demo target is tiny, so this
    measures what the split adds to a round, not what it saves)."""
    from miniserve.config import DEMO_DRAFT

    batch = prompts(4096, n=8)
    out = {}
    for tp in (1, 2):
        kw = engine_kw(args, "bfloat16" if torch.cuda.is_available() else "float32")
        llm = LLM(str(DEMO_TARGET), tensor_parallel_size=tp, speculative_model=str(DEMO_DRAFT), **kw)
        try:
            params = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True)
            llm.generate(batch, params, use_tqdm=False)  # warm-up
            start = time.perf_counter()
            tokens = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
            seconds = time.perf_counter() - start
            stats = llm.engine.stats()
        finally:
            llm.shutdown()
        out[f"tp{tp}"] = {
            "tokens": tokens,
            "output_tok_s": sum(map(len, tokens)) / seconds,
            "mean_acceptance_length": 1 + stats["spec_num_accepted_tokens"] / max(1, stats["spec_num_drafts"]),
        }
    out["identical"] = out["tp1"].pop("tokens") == out["tp2"].pop("tokens")
    print("spec", json.dumps(out), flush=True)
    return out


def check_speed(args) -> dict:
    gen = str(args.gen)
    latency = ["--workload", "latency", "--prompt", "128", "--gen", gen]
    fixed = ["--workload", "fixed", "--batch", "64", "--prompt", "512", "--gen", gen]
    res = {}
    for tp in (1, 2):
        res[f"batch1_tp{tp}"] = throughput(args, tp, latency, "batch1")["runs"][0]
        res[f"batch64_tp{tp}"] = throughput(args, tp, fixed, "batch64")["runs"][0]
    b1 = res["batch1_tp1"]["decode_step_ms"] / res["batch1_tp2"]["decode_step_ms"]
    b64 = res["batch64_tp2"]["output_tok_s"] / res["batch64_tp1"]["output_tok_s"]
    res["summary"] = {
        "batch1_decode_speedup": b1,
        "batch1_target": 1.6,
        "batch1_met": b1 >= 1.6,
        "batch64_speedup": b64,
        "batch64_target": 1.7,
        "batch64_met": b64 >= 1.7,
        "note": "rooflines in throughput.py count the whole model against one GPU's bandwidth",
    }
    if torch.cuda.is_available():  # the profile reads GPU kernels
        profiled = throughput(args, 2, latency + ["--profile"], "batch1_profile")["runs"][0]["profile"]
        names = [(k["name"].lower(), k["us_per_step"]) for k in profiled["kernels"]]
        comm = sum(us for name, us in names if "nccl" in name or "allreduce" in name)
        res["summary"] |= {
            "allreduce_share_of_decode_step_gpu_time": comm / (1e3 * profiled["gpu_ms_per_step"]),
            "decode_step_wall_ms_tp2": profiled["wall_ms_per_step"],
            "decode_step_gpu_ms_tp2": profiled["gpu_ms_per_step"],
        }
    print("speed", json.dumps(res["summary"]), flush=True)
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    pairs = [(int(a), int(b)) for a, b in zip(out[::2], out[1::2])]
    kids = [p for p, parent in pairs if parent == pid]
    return kids + [k for kid in kids for k in descendants(kid)]


def gpu_processes() -> list[str]:
    if not torch.cuda.is_available():
        return []
    q = ["nvidia-smi", "--query-compute-apps=pid,process_name", "--format=csv,noheader"]
    return [line for line in subprocess.run(q, capture_output=True, text=True).stdout.splitlines() if line.strip()]


async def streams(url: str, n: int, max_tokens: int) -> list[int]:
    import httpx

    async def one(client, i):
        body = {"prompt": f"request {i}:", "max_tokens": max_tokens, "temperature": 0, "stream": True}
        body["ignore_eos"] = True
        chunks = 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                chunks += line.startswith("data: {")
        return chunks

    async with httpx.AsyncClient(timeout=600) as client:
        return await asyncio.gather(*(one(client, i) for i in range(n)))


def check_server(args) -> dict:
    model = models(args)["llama-3.2-1b"]
    port = free_port()
    env = {**os.environ, "MINISERVE_MODEL": str(model), "MINISERVE_TENSOR_PARALLEL_SIZE": "2"}
    env["MINISERVE_MAX_NUM_SEQS"] = "64"
    env["MINISERVE_MAX_MODEL_LEN"] = "1024"
    if args.device:
        env["MINISERVE_DEVICE"] = args.device
    cmd = [sys.executable, "-m", "uvicorn", "server:app", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited during start-up with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(1)
    children = descendants(proc.pid)
    gpu_during = gpu_processes()
    start = time.perf_counter()
    chunks = asyncio.run(streams(url, 64, args.gen))
    seconds = time.perf_counter() - start
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(120)
    time.sleep(2)
    left = [p for p in children if Path(f"/proc/{p}").exists()]
    result = {
        "streams": len(chunks),
        "streams_complete": sum(c >= args.gen for c in chunks),
        "seconds": seconds,
        "exit_code": code,
        "rank_processes": children,
        "processes_left": left,
        "gpu_processes_while_serving": gpu_during,
        "gpu_processes_after": gpu_processes(),
    }
    print("server", json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["correctness", "fp8", "spec", "speed", "server"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU dry run of the script)")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--speed-shape", default="llama-3.1-8b")
    ap.add_argument("--ckpt-root", default="/tmp/miniserve-ckpts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out_dir = str(Path(args.out).parent) if args.out else "/tmp"
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        raise SystemExit(f"tensor parallelism needs 2 GPUs; {torch.cuda.device_count()} visible")
    checks = {
        "correctness": check_correctness,
        "fp8": check_fp8,
        "spec": check_spec,
        "speed": check_speed,
        "server": check_server,
    }
    result = {}
    if torch.cuda.is_available():
        result["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    result["nccl_nvls_enable"] = os.environ.get("NCCL_NVLS_ENABLE")
    for part in args.parts:
        result[part] = checks[part](args)
        if args.out:  # after every part: a run cut short keeps what it did
            write_result(args.out, result)


if __name__ == "__main__":
    main()
