"""The throughput benchmark runs on the CPU at tiny shapes, so it cannot rot; its cost model is checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import throughput
from benchmarks.checkpoints import SHAPES, num_parameters

TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 300,
    "max_position_embeddings": 1024,
}


def test_published_shapes_have_their_parameter_counts():
    """The checkpoints are the real models' sizes (Qwen3-0.6B: 596M with tied embeddings; Llama-3.2-1B:
    1.236B; Llama-3.1-8B: 8.030B)."""
    assert round(num_parameters(SHAPES["qwen3-0.6b"]) / 1e6) == 596
    assert round(num_parameters(SHAPES["llama-3.2-1b"]) / 1e6) == 1236
    assert round(num_parameters(SHAPES["llama-3.1-8b"]) / 1e6) == 8030


def test_roofline_counts_weights_per_step_and_live_kv():
    costs = {"weight_bytes": 1000, "kv_bytes_per_token": 10, "linear_flops_per_token": 0, "attn_flops_per_pair": 0}
    # step 0 reads both sequences (lengths 5 and 7), step 1 only the second (now 8 long): 1000+120, 1000+80
    assert throughput.roofline_seconds(costs, [5, 7], [1, 2], gbs=1e-9, tflops=1.0) == pytest.approx(2200)


@pytest.mark.parametrize(
    "workload,extra",
    [
        (
            "fixed",
            ["--batch", "3", "--prompt", "20", "--gen", "6", "--kv-cache-dtype", "auto", "fp8"]
            + ["--decode-splits", "by-length", "by-batch"],
        ),
        (
            "nano",
            ["--nano-seqs", "3", "--nano-len", "24", "--kv-write", "fused", "two_launch", "--kv-cache-dtype", "fp8"]
            + ["--dependent-launch", "off", "auto", "--host-split"],
        ),
        ("prefill", ["--prompts", "40", "90", "--extend-variant", "default", "diag"]),
    ],
)
def test_benchmark_runs_on_the_cpu(tmp_path, workload, extra):
    out = tmp_path / "result.json"
    argv = ["--shape", "llama-3.2-1b", "--overrides", json.dumps(TINY), "--ckpt-root", str(tmp_path / "ckpt")]
    argv += ["--workload", workload, "--repeats", "1", "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    result = throughput.main(argv + extra)
    assert json.loads(out.read_text())["runs"] == json.loads(json.dumps(result["runs"]))
    for run in result["runs"]:
        if workload == "fixed":
            assert run["output_tokens"] == 3 * 6 and run["decode_step_ms_direct"] > 0 and run["decode_step_bytes"] > 0
        elif workload == "nano":
            assert run["output_tokens"] > 0 and run["pct_roofline_assumed"] > 0
            split = run["host_ms_per_step"]  # a step's own phases (model_forward also runs inside forward_launch)
            own = ("wait", "schedule", "forward_launch", "sample_launch", "append_tokens", "collect_outputs")
            assert split["engine_step"] >= sum(split[k] for k in own) and split["forward_launch"] > 0
            assert split["model_forward"] > 0 and split["append_tokens"] > 0 and split["wait"] > 0
        else:
            assert [r["prompt"] for r in run["prefill"]] == [40, 90]
    if workload == "prefill":  # one run per extend variant; the launcher is the default's again afterwards
        from miniserve.kernels import extend_attention as ext

        assert [r.get("extend_variant") for r in result["runs"]] == [None, "diag"]
        assert ext.extend_attention is throughput._EXTEND_LAUNCHER["default"]
    if workload == "fixed":  # each KV dtype with each decode_splits, the engine built with it
        assert [(r["kv_cache_dtype"], r.get("decode_splits")) for r in result["runs"]] == [
            ("auto", None), ("fp8", None), ("auto", "by-batch"), ("fp8", "by-batch")
        ]  # fmt: skip
    if workload == "nano":  # each KV write with each dependent_launch, labelled where not the default
        assert [(r["kv_write"], r.get("dependent_launch")) for r in result["runs"]] == [
            ("fused", "off"), ("fused", None), ("two_launch", "off"), ("two_launch", None)
        ]  # fmt: skip
    assert result["commit"] and result["torch"]


def test_spec_decode_ab_joins_alternated_runs_by_median(tmp_path):
    """benchmarks/spec_decode_ab.py: the median tok/s of each tree's runs (three each here, so the median is a
    run's own value) and their ratio; this tree's commit comes from its runs' provenance."""
    from benchmarks import spec_decode_ab

    speeds = {
        "old": [(100.0, 150.0), (90.0, 160.0), (110.0, 140.0)],
        "new": [(99.0, 165.0), (120.0, 150.0), (101.0, 155.0)],
    }
    for tree, runs in speeds.items():
        for i, (plain, k4) in enumerate(runs, 1):
            rows = [{"k": None, "tokens_per_s": plain}, {"k": 4, "tokens_per_s": k4}]
            prov = {"commit": "abc1234", "dirty": False, "date": "2026-12-02T09:00:00+00:00"}
            env = {
                "gpu": "test",
                "torch": "t",
                "triton": "3",
                "command": "python benchmarks/spec_decode.py --repeats 5",
            }
            (tmp_path / f"spec_decode_{tree}_{i}.json").write_text(
                json.dumps({"provenance": prov, "env": env, "rows": rows})
            )
    out = tmp_path / "spec_decode_ab_h200.json"  # written beside the runs, as the suite does: not read as one
    spec_decode_ab.main([str(tmp_path), "--old-commit", "0ld", "--out", str(out)])
    got = spec_decode_ab.main([str(tmp_path), "--old-commit", "0ld", "--out", str(out)])
    assert json.loads(out.read_text()) == got
    assert got["median_tok_s"] == {"old_plain": 100.0, "old_k4": 150.0, "new_plain": 101.0, "new_k4": 155.0}
    assert got["new_vs_old"] == {"plain": 101.0 / 100.0, "k4": 155.0 / 150.0}
    assert (got["commit"], got["old_commit"], got["date"]) == ("abc1234", "0ld", "2026-12-02")
    assert "3 rounds of `python benchmarks/spec_decode.py --repeats 5`" in got["command"]


def test_engine_ab_pairs_each_configuration_of_each_workload(tmp_path):
    """benchmarks/engine_ab.py: rows match by configuration (not position), a configuration only one tree ran
    is left out, and the provenance is the new tree's with the old commit beside it."""
    from benchmarks import engine_ab

    def result(commit, runs):
        prov = {"commit": commit, "dirty": False, "date": "2026-12-03T08:00:00+00:00", "gpu": "g", "torch": "t"}
        return {**prov, "triton": "3", "command": f"throughput.py at {commit}", "runs": runs}

    old = [
        {"kv_cache_dtype": "fp8", "kv_write": "fused", "output_tok_s": 100.0, "decode_step_ms": 2.0},
        {"kv_cache_dtype": "auto", "kv_write": "fused", "output_tok_s": 80.0, "decode_step_ms": 2.5},
        {"kv_cache_dtype": "auto", "kv_write": "fused", "decode_splits": "by-batch", "output_tok_s": 90.0},
    ]
    new = [
        {"kv_cache_dtype": "auto", "kv_write": "fused", "output_tok_s": 88.0, "decode_step_ms": 2.25},
        {"kv_cache_dtype": "fp8", "kv_write": "fused", "output_tok_s": 110.0, "decode_step_ms": 1.8},
        {"kv_cache_dtype": "fp8", "kv_write": "fused", "decode_variant": "staged", "output_tok_s": 120.0},
        {"kv_cache_dtype": "auto", "kv_write": "fused", "decode_splits": "by-batch", "output_tok_s": 99.0},
    ]
    (tmp_path / "throughput_old_fixed.json").write_text(json.dumps(result("0ld", old)))
    (tmp_path / "throughput_new_fixed.json").write_text(json.dumps(result("n3w", new)))
    (tmp_path / "throughput_new_nano.json").write_text(json.dumps(result("n3w", new)))  # no old: left out
    got = engine_ab.main([str(tmp_path), "--out", str(tmp_path / "engine_ab_h200.json")])
    assert list(got["workloads"]) == ["fixed"]
    rows = got["workloads"]["fixed"]["rows"]
    assert [r["config"] for r in rows] == ["auto", "fp8", "auto by-batch"]  # decode_splits is a configuration
    assert [r["new_vs_old"] for r in rows] == [88.0 / 80.0, 110.0 / 100.0, 99.0 / 90.0]
    assert (rows[1]["old_decode_step_ms"], rows[1]["new_decode_step_ms"]) == (2.0, 1.8)
    assert (got["commit"], got["old_commit"], got["date"]) == ("n3w", "0ld", "2026-12-03")


def test_decode_ab_compares_each_case_bit_for_bit_and_in_time():
    """benchmarks/decode_ab.py's join: a case is identical only when every bit is (a one-ulp change is caught and
    its size reported), and the speedup is the old time over the new."""
    import torch

    from benchmarks.decode_ab import compare

    out = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    nudged = out.clone()
    nudged.view(torch.int16)[1] += 1  # one ulp
    old = {"a": (out, 10.0), "b": (out, 8.0)}
    rows = compare(old, {"a": (out.clone(), 5.0), "b": (nudged, 8.0)})
    assert [(r["case"], r["identical"], r["speedup"]) for r in rows] == [("a", True, 2.0), ("b", False, 1.0)]
    assert rows[0]["max_abs_diff"] == 0 and rows[1]["max_abs_diff"] == 2.0**-6


def test_serve_ab_keeps_each_pair_of_runs_side_by_side(tmp_path):
    """benchmarks/serve_ab.py: each named pair's old and new run, with what the README quotes from them."""
    from benchmarks import serve_ab

    def run(commit: str, stream: float, plain: float | None) -> Path:
        phase = {"output_tok_s": 1000.0, "ms_per_step": 5.0}
        latency = {"itl_ms": {"p50": 9.0}, "ttft_ms": {"p50": 300.0}, "tpot_ms": {"p50": 8.0}}
        phases = {
            "stream": {**phase, "vs_offline": stream, **latency, "repeats_ttft_p50_ms": [7.0, 5.0, 6.0]},
            "plain": {**phase, "vs_offline": plain},
            "offline": {"output_tok_s": 1100.0, "decode_step_ms": 6.0},
        }
        if plain is None:  # a run below saturation: streamed only, with the lone prefill beside it
            del phases["plain"]
            phases["offline"]["single_request_prefill_ms"] = 3.0
        versions = {"commit": commit, "dirty": False, "date": "2026-12-03T09:00:00", "gpu": "g", "torch": "t"}
        path = tmp_path / f"{commit}.json"
        path.write_text(
            json.dumps({"command": f"serve.py at {commit}", "versions": {**versions, "triton": "3"}, "phases": phases})
        )
        return path

    a, b, c = run("0ld", 0.9, 0.8), run("m1d", 0.95, 0.9), run("n3w", 0.97, 1.0)
    got = serve_ab.main(
        ["--pair", "one", str(a), str(b), "--pair", "two", str(b), str(c), "--out", str(tmp_path / "ab.json")]
    )
    assert list(got["pairs"]) == ["one", "two"]
    assert (
        got["pairs"]["one"]["old"]["stream"]["vs_offline"] == 0.9
        and got["pairs"]["two"]["new"]["plain"]["vs_offline"] == 1.0
    )
    assert got["pairs"]["two"]["old"]["commit"] == "m1d" and got["commit"] == "n3w"
    assert (
        "itl_p50_ms" in got["pairs"]["one"]["new"]["stream"] and "itl_p50_ms" not in got["pairs"]["one"]["new"]["plain"]
    )
    assert got["pairs"]["one"]["old"]["offline"] == {"output_tok_s": 1100.0, "decode_step_ms": 6.0}
    stream = got["pairs"]["one"]["new"]["stream"]  # latencies: the median of the repeats' p50s, else the run's
    assert (stream["ttft_p50_ms"], stream["itl_p50_ms"], stream["tpot_p50_ms"]) == (6.0, 9.0, 8.0)
    # --keep: a later pair joins the file's pairs (a pair of the same name is replaced)
    later = serve_ab.main(
        ["--pair", "two", str(a), str(c), "--pair", "three", str(a), str(b)]
        + ["--out", str(tmp_path / "ab.json"), "--keep"]
    )
    assert list(later["pairs"]) == ["one", "two", "three"] and later["pairs"]["one"] == got["pairs"]["one"]
    assert later["pairs"]["two"]["old"]["commit"] == "0ld" and later["commit"] == "m1d"
    fresh = serve_ab.main(["--pair", "three", str(a), str(b), "--out", str(tmp_path / "ab.json")])
    assert list(fresh["pairs"]) == ["three"]
    rate = serve_ab.main(["--pair", "rate", str(run("r0", 0.1, None)), str(c), "--out", str(tmp_path / "r.json")])
    old = rate["pairs"]["rate"]["old"]
    assert "plain" not in old and old["stream"]["ttft_p50_ms"] == 6.0
    assert old["offline"]["single_request_prefill_ms"] == 3.0


def test_engine_ab_joins_one_trees_runs_of_a_setting(tmp_path):
    """engine_ab.py --setting: in each throughput_setting_*.json, the run with the setting at another value is
    paired with the default run of the same configuration (not by position), and says which value it had."""
    from benchmarks import engine_ab

    runs = [
        {"kv_cache_dtype": "auto", "kv_write": "fused", "output_tok_s": 90.0, "decode_step_ms": 1.1},
        {"kv_cache_dtype": "fp8", "kv_write": "fused", "output_tok_s": 120.0},
        {"kv_cache_dtype": "fp8", "kv_write": "fused", "dependent_launch": "off", "output_tok_s": 100.0},
        {"kv_cache_dtype": "auto", "kv_write": "fused", "dependent_launch": "off", "output_tok_s": 80.0,
         "decode_step_ms": 1.25},
    ]  # fmt: skip
    prov = {"commit": "n3w", "date": "2026-12-04T08:00:00+00:00", "gpu": "g", "torch": "t", "triton": "3"}
    (tmp_path / "throughput_setting_latency.json").write_text(json.dumps({**prov, "command": "c", "runs": runs}))
    got = engine_ab.main([str(tmp_path), "--setting", "dependent_launch", "--out", str(tmp_path / "o.json")])
    rows = got["workloads"]["latency"]["rows"]
    assert [(r["config"], r["other"], r["new_vs_old"]) for r in rows] == [("auto", "off", 90 / 80), ("fp8", "off", 1.2)]
    assert (rows[0]["old_decode_step_ms"], rows[0]["new_decode_step_ms"]) == (1.25, 1.1)
    assert got["workloads"]["latency"]["commit"] == "n3w" and got["setting"] == "dependent_launch"


def test_rounds_alternate_the_configurations_and_report_medians(tmp_path):
    """--rounds 3 on the CPU: every configuration runs once a round, in the same order; each reported number is
    the median of its three rounds (a sweep point's too), labels stay as they are."""
    out = tmp_path / "result.json"
    argv = ["--shape", "llama-3.2-1b", "--overrides", json.dumps(TINY), "--ckpt-root", str(tmp_path / "ckpt")]
    argv += ["--workload", "sweep", "--batches", "1", "2", "--prompt", "12", "--gen", "4", "--repeats", "1"]
    argv += ["--kv-cache-dtype", "auto", "fp8", "--rounds", "3", "--device", "cpu", "--dtype", "float32"]
    result = throughput.main(argv + ["--out", str(out)])
    rounds = result["rounds"]
    assert len(rounds) == 3 and all([r["kv_cache_dtype"] for r in runs] == ["auto", "fp8"] for runs in rounds)
    for i, run in enumerate(result["runs"]):
        assert run["kv_dtype"] == rounds[0][i]["kv_dtype"]
        for j, point in enumerate(run["sweep"]):
            speeds = sorted(r[i]["sweep"][j]["output_tok_s"] for r in rounds)
            assert point["output_tok_s"] == speeds[1] and point["batch"] == [1, 2][j]
    assert json.loads(out.read_text())["rounds"] == json.loads(json.dumps(rounds))


def test_median_of_rounds_field_by_field():
    rounds = [
        [{"kv": "fp8", "tok_s": 3.0, "points": [{"b": 1, "t": 9.0}], "n": 4, "ok": True}],
        [{"kv": "fp8", "tok_s": 1.0, "points": [{"b": 1, "t": 7.0}], "n": 6, "ok": True}],
        [{"kv": "fp8", "tok_s": 2.5, "points": [{"b": 1, "t": 8.0}], "n": 5, "ok": True}],
    ]
    median = throughput.median_of_rounds(rounds)
    assert median == [{"kv": "fp8", "tok_s": 2.5, "points": [{"b": 1, "t": 8.0}], "n": 5, "ok": True}]
    assert type(median[0]["n"]) is int


@pytest.mark.parametrize("argv", [["--workload", "prefill"], ["--workload", "prefix"], ["--speculative-model", "x"]])
def test_host_split_is_for_plain_decoding_workloads(argv, capsys):
    with pytest.raises(SystemExit):
        throughput.main([*argv, "--host-split", "--device", "cpu"])
    assert "--host-split times plain decoding" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--rounds", "2"], ["--rounds", "0"], ["--rounds", "3", "--profile"], ["--rounds", "3", "--workload", "prefix"]],
)
def test_rounds_are_odd_and_not_for_profiles_or_the_prefix_workload(argv, capsys):
    with pytest.raises(SystemExit):
        throughput.main([*argv, "--device", "cpu"])
    assert "--rounds must be" in capsys.readouterr().err
