"""benchmarks/serve.py end to end on tiny shapes (so it cannot rot): it builds a tiny random checkpoint, starts
the server, streams and collects the workload, runs it offline, measures the client against its stub and the API
process against the fake engine; the JSON holds every phase, and the counts match what was asked. Also with two
API server processes, and with --trace-dir (benchmarks/serve_trace.py's analysis of every stage's timestamps)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def test_serve_benchmark_runs_every_phase_on_a_tiny_shape_and_traces_it(tmp_path):
    """Every phase, with --trace-dir (one server start for both: see `check_trace`)."""
    out = tmp_path / "serve.json"
    cmd = [
        sys.executable,
        "benchmarks/serve.py",
        "--shape",
        "llama-3.2-1b",
        "--overrides",
        json.dumps(TINY),
        "--ckpt-root",
        str(tmp_path / "ckpt"),
        "--engine-args",
        "--device cpu --max-num-seqs 8 --block-size 16",
        "--num-prompts",
        "6",
        "--input-len",
        "40",
        "--output-len",
        "5",
        "--request-rate",
        "50",
        "--phases",
        "stream,plain,offline,stub,fake",
        "--fake-step-ms",
        "2",
        "--client-procs",
        "2",
        "--stub-procs",
        "1",
        "--warmup",
        "1",
        "--trace-dir",
        str(tmp_path / "trace"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert "serve.py" in res["command"] and res["versions"]["torch"]
    stream, plain, offline, stub, fake = (res["phases"][k] for k in ("stream", "plain", "offline", "stub", "fake"))
    for phase in (stream, plain, stub, fake):
        assert phase["completed"] == 6 and phase["failed"] == 0, phase
        assert phase["output_tokens"] == 6 * 5
    # every streamed token arrived as (part of) a content event; latencies are ordered as they must be
    assert 6 <= stream["content_events"] <= 30
    assert 0 < stream["ttft_ms"]["p50"] <= stream["e2e_ms"]["p50"]
    assert stream["ttft_ms"]["p50"] <= stream["ttft_ms"]["p90"] <= stream["ttft_ms"]["p99"]
    assert stream["itl_ms"]["p50"] >= 0 and stream["tpot_ms"]["p50"] > 0
    assert offline["output_tokens"] == 30 and offline["output_tok_s"] > 0 and offline["decode_step_ms"] > 0
    assert stream["vs_offline"] == stream["output_tok_s"] / offline["output_tok_s"]
    assert stub["content_events"] == 30  # the stub sends one event per token
    # the fake engine (benchmarks/fake_engine.py) behind the real app: 5 tokens each, 2 ms apart at the fastest
    # (its steps keep a schedule: late ones, on a loaded machine, catch up back to back, so only the whole run is
    # bounded: the request that waited for all 5 steps took at least 4 gaps)
    assert 6 <= fake["content_events"] <= 30 and fake["e2e_ms"]["p99"] >= 4 * 2
    # engine steps per phase (the server's iteration histogram; offline counts engine.step calls): 5 tokens each
    # take at least 5 steps, and 6 requests one at a time at most 6 x 5
    for phase in (stream, plain, offline):
        assert 5 <= phase["engine_steps"] <= 30, phase
        assert phase["ms_per_step"] > 0
    assert round(stream["tokens_per_step"] * stream["engine_steps"]) == 6 * 40 + 6 * 4  # prompts, 4 decodes each
    # the TTFT of a request alone on the server: new prompts, one at a time, 2 tokens each
    sys.path.insert(0, str(REPO / "benchmarks"))
    import serve

    lone = res["phases"]["lone"]
    assert lone["completed"] == serve.LONE_REQUESTS and lone["output_tokens"] == 2 * serve.LONE_REQUESTS
    assert lone["duration_s"] >= (serve.LONE_REQUESTS - 1) * serve.IDLE_S
    assert stream["ttft_p50_vs_lone"] == stream["ttft_ms"]["p50"] / lone["ttft_ms"]["p50"]
    check_trace(res)


def _serve(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "benchmarks/serve.py", "--shape", "llama-3.2-1b", "--overrides", json.dumps(TINY)]
    cmd += ["--ckpt-root", str(tmp_path / "ckpt"), "--num-prompts", "6", "--input-len", "12", "--output-len", "5"]
    cmd += ["--client-procs", "1", "--warmup", "1", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def check_trace(res: dict) -> None:
    """The trace splits each streamed request's time to first token into its stages, on the real engine and the
    fake one. Phases on one server must not reuse each other's prompts (the prefix cache would skip their prefill:
    the second phase then looked faster than offline): both phases compute the same number of tokens, every prompt
    token included. The traced ramps count each phase's steps, from the engine's own messages, as /metrics does."""
    for key, phase in (("real/stream", "stream"), ("fake/stream", "fake")):
        trace = res["trace"][key]
        assert trace["streams"] == 6 and trace["client_events"] == res["phases"][phase]["content_events"]
        assert trace["engine_steps"] >= 5 and trace["body_writes"] >= trace["client_events"]
        for stage in ("admission", "to_engine", "engine", "to_client"):
            p50, p90, p99 = (float(x) for x in trace[f"ttft_{stage}_ms"].split()[1::2])
            assert 0 <= p50 <= p90 <= p99, (stage, trace)
    phases = res["phases"]
    computed = {ph: phases[ph]["engine_steps"] * phases[ph]["tokens_per_step"] for ph in ("stream", "plain")}
    assert round(computed["stream"]) == round(computed["plain"]) >= 6 * 40, computed
    for ph in ("stream", "plain", "offline"):
        ramp = res["trace"][f"ramp/{ph}"]
        steps = ramp["steps_until_last_add"] + ramp["steps_after_last_add"]
        assert steps == res["phases"][ph]["engine_steps"], (ph, ramp)
        assert 0 < ramp["last_step_ms"] <= res["phases"][ph]["duration_s"] * 1000
    assert res["trace"]["ramp/offline"]["steps_until_last_add"] == 0  # offline has every request at once
    for ph in ("stream", "plain"):  # the real engine's own time per step, and its message's
        ramp = res["trace"][f"ramp/{ph}"]
        assert 0 < ramp["engine_step_ms_after_last_add"] and 0 < ramp["send_ms_after_last_add"], ramp


def test_prompts_are_drawn_below_the_models_vocabulary(tmp_path):
    """A checkpoint whose tokenizer adds tokens past the model's embedding rows (Llama's BOS/EOS ids at 128000 over
    a 300-row tiny shape): prompt ids come from the rows the engine accepts, not the tokenizer's count."""
    import argparse

    from benchmarks.checkpoints import build_checkpoint
    from miniserve.tokenizer import Tokenizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    import serve

    shape = {**TINY, "vocab_size": 300, "bos_token_id": 128000, "eos_token_id": 128001}
    model = build_checkpoint("llama-3.2-1b", tmp_path, overrides=shape)
    assert json.loads((model / "config.json").read_text())["vocab_size"] == 300
    assert Tokenizer.from_pretrained(model).vocab_size > 300  # (its BOS/EOS added past the rows)
    assert serve.vocab_of(argparse.Namespace(model=str(model), vocab_size=None)) == 300


def test_repeats_report_the_median_run_of_each_phase_with_two_api_servers(tmp_path):
    res = _serve(tmp_path, "--phases", "stream,plain,offline", "--repeats", "3", "--input-len", "40",
                 "--engine-args=--device cpu --max-num-seqs 8 --block-size 16 --api-servers 2")  # fmt: skip
    phases = res["phases"]
    for ph in ("stream", "plain"):  # behind two API servers
        assert phases[ph]["completed"] == 6 and phases[ph]["output_tokens"] == 30 and phases[ph]["vs_offline"] > 0
    assert phases["offline"]["output_tokens"] == 30  # (the offline engine took the engine's flags only)
    for ph in ("stream", "plain", "offline"):
        runs = phases[ph]["repeats_tok_s"]
        assert len(runs) == 3 and phases[ph]["output_tok_s"] == sorted(runs)[1], (ph, phases[ph])
    for ph in ("stream", "plain"):
        assert phases[ph]["vs_offline"] == phases[ph]["output_tok_s"] / phases["offline"]["output_tok_s"]
    # the latency ratios take the median of the streamed runs' p50s, not the median-throughput run's own
    itls = phases["stream"]["repeats_itl_p50_ms"]
    assert len(itls) == 3 and len(phases["stream"]["repeats_ttft_p50_ms"]) == 3
    assert len(phases["stream"]["repeats_tpot_p50_ms"]) == 3
    assert "repeats_itl_p50_ms" not in phases["plain"]
    step = phases["offline"]["decode_step_ms"]
    assert phases["stream"]["itl_p50_vs_decode_step"] == pytest.approx(sorted(itls)[1] / step)
    ttft = sorted(phases["stream"]["repeats_ttft_p50_ms"])[1]
    prefill = phases["offline"]["single_request_prefill_ms"]
    assert phases["stream"]["ttft_p50_vs_prefill"] == pytest.approx(ttft / prefill)
    assert phases["stream"]["ttft_p50_vs_lone"] == pytest.approx(ttft / phases["lone"]["ttft_ms"]["p50"])
    # new prompts each repeat: the median run computed every prompt token too, as the other phase did
    computed = {ph: phases[ph]["engine_steps"] * phases[ph]["tokens_per_step"] for ph in ("stream", "plain")}
    assert round(computed["stream"]) == round(computed["plain"]) >= 6 * 40, computed


def test_the_prefill_reference_runs_new_prompts_alone_warm_and_after_an_idle_gap(monkeypatch):
    """The TTFT reference must not hit the prefix cache: on the demo engine, after the workload's prompts ran, every
    prompt the reference runs computes all its tokens (the engine's own num_cached_tokens is 0), alone, making one
    token; the second half each after IDLE_S of (here faked) sleep."""
    import random
    import types

    sys.path.insert(0, str(REPO / "benchmarks"))
    import serve

    from miniserve import LLM, SamplingParams

    llm = LLM()
    rng = random.Random(0)
    workload = [[rng.randrange(3, 900) for _ in range(n)] for n in (40, 48, 36)]
    llm.generate(workload, SamplingParams(max_tokens=2), use_tqdm=False)
    runs, sleeps, generate = [], [], llm.generate

    def recorded(prompts, params, use_tqdm=False):
        outs = generate(prompts, params, use_tqdm=use_tqdm)
        runs.append((len(prompts), len(prompts[0]), [len(c.token_ids) for c in outs[0].outputs], len(sleeps)))
        runs[-1] += (outs[0].num_cached_tokens,)
        return outs

    monkeypatch.setattr(llm, "generate", recorded)
    monkeypatch.setattr(serve, "time", types.SimpleNamespace(sleep=sleeps.append, perf_counter=time.perf_counter))
    warm, idle = serve.single_prefills(llm, [len(p) for p in workload], seed=0, sync=lambda: None)
    assert 0 < warm and 0 < idle
    assert [(alone, n, out, cached) for alone, n, out, _, cached in runs] == [(1, n, [1], 0) for n in (40, 48, 36)] * 2
    assert sleeps == [serve.IDLE_S] * 3 and [k for *_, k, _ in runs] == [0, 0, 0, 1, 2, 3]


def test_the_decode_step_reference_is_the_measured_runs_full_batch_decode_steps():
    """serve.py's ITL reference: the median time between the ends of consecutive steps that decoded the whole batch
    (one token per request), read from the offline run's own step timeline; prompt passes and steps of a partial
    batch are left out."""
    from benchmarks.serve import decode_step_time

    timeline = [(0.0, 4096), (0.010, 8), (0.013, 8), (0.0165, 8), (0.020, 7), (0.024, 8), (0.0255, 3), (0.030, 4100)]
    # the steps that computed 8 tokens end 10, 3, 3.5 and 4 ms after the step before them
    assert decode_step_time(timeline, 8) == pytest.approx(0.00375)
    assert math.isnan(decode_step_time(timeline[:1], 8))
