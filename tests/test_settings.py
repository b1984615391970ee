"""Settings: every EngineConfig/ServerConfig field is a CLI flag and a MINISERVE_* variable with help text,
bad values are one-line errors naming their source, and the README's table is the generated one."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from miniserve import cli
from miniserve.config import EngineConfig, ServerConfig, SettingError
from miniserve.server.app import settings_from_env
from miniserve.settings import from_sources, markdown_table, variable_warnings

REPO = Path(__file__).resolve().parent.parent
SERVER_FLAGS = {"--" + f.name.replace("_", "-") for f in fields(ServerConfig)}


def sample(cls: type, f) -> object:
    """A valid value other than the default (choices written down here, not read from the field's metadata)."""
    special = {
        "dtype": "bfloat16",
        "kv_cache_dtype": "fp8",
        "speculative_kv_cache_dtype": "float16",
        "attention_backend": "torch",
        "fp8_decode": "hw-staged",
        "decode_splits": "by-batch",
        "dependent_launch": "off",
        "generation_config": "vllm",
        "log_level": "debug",
        "http_parser": "h11",
        "reasoning_parser": "qwen3",
        "block_size": 32,
        "gpu_memory_utilization": 0.5,
        "allowed_origins": "http://page.example",
        "tool_call_parser": "mistral",
        "override_generation_config": '{"temperature": 0.5}',
        "speculative_config": '{"model": "demo", "num_speculative_tokens": 2}',
        "root_path": "/api",
        "chat_template_content_format": "openai",
        "scheduling_policy": "priority",
    }
    if f.name in special:
        return special[f.name]
    default = None if f.default is MISSING else f.default
    kind = next(
        t
        for t in (bool, int, float, str)
        if t in (typing.get_type_hints(cls)[f.name], *typing.get_args(typing.get_type_hints(cls)[f.name]))
    )
    if kind is bool:
        return not default
    if kind is int:
        return 7 if default is None else default + 3
    if kind is float:
        return 0.25 if default is None else default * 2
    return f"/some/{f.name}"  # the str fields without choices: paths, names, keys, device, host


def as_text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.fixture(autouse=True)
def no_miniserve_variables(monkeypatch):
    """The tests read exact messages: none of the caller's MINISERVE_* variables (each would add a line)."""
    for name in [n for n in os.environ if n.startswith("MINISERVE_")]:
        monkeypatch.delenv(name)


NEEDED_VALUES = {"allowed_origins": "http://a.example"}  # a value of a setting another needs, where "demo" is none


@pytest.mark.parametrize("cls", [EngineConfig, ServerConfig])
def test_every_field_is_a_flag_and_a_variable(cls):
    command = "serve" if cls is ServerConfig else "generate"
    parser = cli.build_parser()
    for f in fields(cls):
        value, flag, var = sample(cls, f), "--" + f.name.replace("_", "-"), "MINISERVE_" + f.name.upper()
        assert f.metadata["help"], f.name
        if isinstance(value, bool):
            argv = [flag if value else "--no-" + flag[2:]]
        else:
            argv = [flag, as_text(value)]
        extra = ["--prompt", "x"] if command == "generate" else []
        needs = f.metadata["needs"]  # (a setting that does nothing alone comes with the one it needs)
        needed = next((g for g in fields(cls) if g.name == needs), None)
        needed_value = "1" if needed and needed.type in (bool, "bool") else NEEDED_VALUES.get(needs, "demo")
        base = {"MINISERVE_" + needs.upper(): needed_value} if needs else {}
        args = parser.parse_args([command, *extra, *argv])
        assert getattr(from_sources(cls, args, env=base), f.name) == value, flag
        assert getattr(from_sources(cls, None, env={**base, var: as_text(value)}), f.name) == value, var
        # the flag beats the variable; an empty variable is unset
        default = getattr(cls(), f.name)
        assert getattr(from_sources(cls, args, env={**base, var: as_text(default)}), f.name) == value
        assert getattr(from_sources(cls, None, env={**base, var: ""}), f.name) == default


def test_help_lists_every_flag_with_help_and_default_and_generate_has_no_server_flags():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    serve_help, generate_help = subparsers["serve"].format_help(), subparsers["generate"].format_help()
    for cls in (EngineConfig, ServerConfig):
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            assert flag in serve_help and ("MINISERVE_" + f.name.upper()) in serve_help
            assert (flag in generate_help) == (cls is EngineConfig), flag
    assert "{auto,fp8,fp8_e4m3" in generate_help  # choices are listed
    generate_flags = {o for a in subparsers["generate"]._actions for o in a.option_strings}
    assert not generate_flags & SERVER_FLAGS
    for action in subparsers["generate"]._actions + subparsers["serve"]._actions:
        if action.option_strings != ["-h", "--help"] and action.dest != "prompt":
            assert action.help and "default:" in action.help, action.option_strings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MINISERVE_MAX_NUM_SEQS": "abc"}, "MINISERVE_MAX_NUM_SEQS='abc': must be an integer"),
        ({"MINISERVE_GPU_MEMORY_UTILIZATION": "lots"}, "MINISERVE_GPU_MEMORY_UTILIZATION='lots': must be a number"),
        ({"MINISERVE_ENFORCE_EAGER": "maybe"}, "MINISERVE_ENFORCE_EAGER='maybe': must be one of 1, true"),
        ({"MINISERVE_DTYPE": "fp4"}, "MINISERVE_DTYPE='fp4': dtype must be one of auto, float32"),
        ({"MINISERVE_BLOCK_SIZE": "12"}, "MINISERVE_BLOCK_SIZE='12': block_size must be a positive power of two"),
        ({"MINISERVE_MAX_NUM_SEQS": "0"}, "MINISERVE_MAX_NUM_SEQS='0': max_num_seqs must be >= 1"),
    ],
)
def test_bad_variables_name_the_variable(env, message):
    with pytest.raises(ValueError) as info:
        from_sources(EngineConfig, None, env=env)
    assert str(info.value).startswith(message)


def test_num_speculative_tokens_stops_where_verification_leaves_the_decode_kernel():
    """k+1 tokens a sequence must still run as decode queries (ModelRunner._for_kernels), or greedy speculation on
    the Triton backend would no longer reproduce plain decoding bit for bit."""
    from miniserve.engine.model_runner import DECODE_QUERIES_MAX_LEN

    assert EngineConfig(num_speculative_tokens=15).num_speculative_tokens == 15 == DECODE_QUERIES_MAX_LEN - 1
    with pytest.raises(ValueError, match="num_speculative_tokens must be <= 15, got 16"):
        EngineConfig(num_speculative_tokens=16)


def test_bad_flag_and_bad_variable_are_one_line_cli_errors(monkeypatch, capsys):
    assert cli.main(["generate", "--prompt", "x", "--block-size", "12"]) == 2
    err = capsys.readouterr().err
    assert err == "miniserve: error: --block-size: block_size must be a positive power of two, got 12\n"
    assert cli.main(["serve", "--api-key", " "]) == 2
    assert capsys.readouterr().err == (
        "miniserve: error: --api-key: api_key must not be empty: leave it unset for its default\n"
    )
    assert cli.main(["serve", "--api-key", "[]"]) == 2
    assert capsys.readouterr().err == (
        "miniserve: error: --api-key: api_key must not be empty: leave it unset to serve without a key\n"
    )
    assert cli.main(["serve", "--served-model-name", "[]"]) == 2
    assert capsys.readouterr().err == (
        "miniserve: error: --served-model-name: served_model_name must not be empty: leave it unset for the model's\n"
    )
    # a setting that does nothing without another, given alone
    assert cli.main(["generate", "--prompt", "x", "--num-speculative-tokens", "3"]) == 2
    assert capsys.readouterr().err == (
        "miniserve: error: --num-speculative-tokens: does nothing without --speculative-model\n"
    )
    env = {"MINISERVE_OVERLAP_SPEC_ROUNDS": "0"}
    with pytest.raises(ValueError, match="^MINISERVE_OVERLAP_SPEC_ROUNDS='0': does nothing without MINISERVE_SPEC"):
        from_sources(EngineConfig, env=env)
    assert from_sources(EngineConfig, env={**env, "MINISERVE_SPECULATIVE_MODEL": "demo"}).overlap_spec_rounds is False
    env = {"MINISERVE_MAX_LOG_LEN": "10"}  # what it needs is a switch: off (its default) or given off
    for switch in ({}, {"MINISERVE_ENABLE_LOG_REQUESTS": "0"}):
        with pytest.raises(ValueError, match="^MINISERVE_MAX_LOG_LEN='10': does nothing without MINISERVE_ENABLE_LOG"):
            from_sources(ServerConfig, env={**env, **switch})
    assert from_sources(ServerConfig, env={**env, "MINISERVE_ENABLE_LOG_REQUESTS": "1"}).max_log_len == 10
    monkeypatch.setenv("MINISERVE_MAX_WAITING", "-1")
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err == "miniserve: error: MINISERVE_MAX_WAITING='-1': max_waiting must be >= 0, got -1\n"


def test_vllms_spelling_of_a_flag_sets_the_same_setting():
    """--api-server-count and --uvicorn-log-level, as `vllm serve` spells them, beside this server's own names;
    --disable-uvicorn-access-log and --disable-log-requests turn their switches off."""
    parser = cli.build_parser()
    for argv in (
        ["--api-server-count", "3", "--uvicorn-log-level", "debug"],
        ["--api-servers", "3", "--log-level", "debug"],
    ):
        server = from_sources(ServerConfig, parser.parse_args(["serve", *argv]), env={})
        assert (server.api_servers, server.log_level) == (3, "debug"), argv
    # vLLM's flags that turn a switch off; unset, the variable or the default decides
    off = parser.parse_args(["serve", "--disable-uvicorn-access-log", "--disable-log-requests"])
    server = from_sources(ServerConfig, off, env={"MINISERVE_ACCESS_LOG": "1", "MINISERVE_ENABLE_LOG_REQUESTS": "1"})
    assert (server.access_log, server.enable_log_requests) == (False, False)
    server = from_sources(ServerConfig, parser.parse_args(["serve"]), env={"MINISERVE_ACCESS_LOG": "0"})
    assert (server.access_log, server.enable_log_requests) == (False, False)
    assert from_sources(ServerConfig, parser.parse_args(["serve"]), env={}).access_log is True
    with pytest.raises(SystemExit):  # (argparse's own error: the value is checked against the choices)
        parser.parse_args(["serve", "--uvicorn-log-level", "loud"])
    serve_help = next(a for a in parser._actions if a.dest == "command").choices["serve"].format_help()
    assert "--api-servers API_SERVERS, --api-server-count API_SERVERS" in serve_help


def test_vllms_flags_that_change_nothing_here_are_taken_with_a_warning_each(capsys):
    """A `vllm serve` command line keeps its no-op flags: each given one is named in a warning (printed before the
    start), a value that would change something (a second pipeline stage) is refused; -tp is
    --tensor-parallel-size."""
    parser = cli.build_parser()
    argv = ["--trust-remote-code", "--swap-space", "16", "--distributed-executor-backend", "mp", "-tp", "2"]
    args = parser.parse_args(["serve", *argv])
    named = [line.split(" ", 1)[0] for line in cli.no_op_warnings(args)]
    assert named == ["--trust-remote-code", "--swap-space", "--distributed-executor-backend"]
    assert from_sources(EngineConfig, args, env={}).tensor_parallel_size == 2
    assert cli.no_op_warnings(parser.parse_args(["serve"])) == []
    assert cli.main(["serve", "--enable-chunked-prefill", "--max-num-seqs", "0"]) == 2  # (stops at the setting)
    err = capsys.readouterr().err
    assert "miniserve: warning: --enable-chunked-prefill is taken but changes nothing: prompts are always" in err
    for refused in (["--pipeline-parallel-size", "2"], ["--distributed-executor-backend", "ray"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *refused])
    # `generate` reads no chat template, logprobs, bad words or grammar: such engine flags are named too
    args = parser.parse_args(["generate", "--prompt", "x", "--chat-template", "{{ 1 }}", "--max-logprobs", "3"])
    assert cli.no_op_warnings(args) == [
        "--chat-template is taken but changes nothing for `generate`",
        "--max-logprobs is taken but changes nothing for `generate`",
    ]
    assert cli.no_op_warnings(parser.parse_args(["generate", "--prompt", "x", "--max-num-seqs", "2"])) == []
    assert cli.main(["generate", "--prompt", "x", "--max-tokens", "1", "--chat-template", "no-such-file"]) == 0
    assert "--chat-template is taken but changes nothing" in capsys.readouterr().err  # not also an error after it


def test_serve_takes_the_model_positionally_as_vllm_serve_does(capsys):
    def model_of(argv: list[str]) -> str | None:
        args = cli.build_parser().parse_args(argv)
        cli.take_model_tag(args)
        return from_sources(EngineConfig, args, env={}).model

    assert model_of(["serve", "/models/llama", "--port", "9000"]) == "/models/llama"
    assert model_of(["serve", "--port", "9000", "/models/llama"]) == "/models/llama"
    assert model_of(["serve", "/models/llama", "--model", "/models/llama"]) == "/models/llama"
    assert model_of(["serve", "--model", "/models/qwen"]) == "/models/qwen"
    assert model_of(["serve"]) == EngineConfig().model  # the demo model
    assert model_of(["serve", "/models/llama", "--model", "/models/llama/"]) == "/models/llama"  # the same one
    assert cli.main(["serve", "/models/llama", "--model", "/models/qwen"]) == 2
    assert capsys.readouterr().err == (
        "miniserve: error: the model is given twice: '/models/llama' and --model '/models/qwen'\n"
    )
    # a value given to a switch is read as MODEL: the error says so
    assert cli.main(["serve", "--enable-prefix-caching", "false"]) == 2
    assert "'false' does not exist (read as the positional MODEL" in capsys.readouterr().err
    # MODEL after a flag that takes several words is one of them: said, not served as the demo model unseen
    from miniserve.config import DEMO_TARGET

    assert cli.main(["serve", "--served-model-name", "mine", str(DEMO_TARGET)]) == 2
    assert f"--served-model-name took 2 words and no model is given: if '{DEMO_TARGET}' is" in capsys.readouterr().err
    assert cli.main(["serve", "--api-key", "k", "/no/such/model"]) == 2
    assert "--api-key took 2 words and no model is given: if '/no/such/model'" in capsys.readouterr().err
    assert model_of(["serve", str(DEMO_TARGET), "--served-model-name", "mine", "other"]) == str(DEMO_TARGET)


def test_abbreviated_flags_are_errors_that_name_them(capsys):
    """argparse would take --max-model for --max-model-len: "any other flag is an error that names it"."""
    for argv in (["serve", "--max-model", "64"], ["generate", "--prompt", "x", "--enable-prefix"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert f"unrecognized arguments: {argv[-2] if argv[0] == 'serve' else argv[-1]}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [('{"foo": 1}', "unknown key 'foo' (the keys are temperature"), ('{"temperature": "hot"}', "temperature"),
     ('{"top_p": 1.5}', "top_p"), ('{"max_new_tokens": 0}', "max_tokens")],
)  # fmt: skip
def test_override_generation_config_is_checked_before_any_model_loads(override, message):
    """Its keys and values are checked as the settings are read (the model directory here does not exist)."""
    with pytest.raises(SettingError, match=re.escape(f"override_generation_config: {message}")):
        EngineConfig(model="/nowhere", override_generation_config=override)
    assert EngineConfig(override_generation_config='{"temperature": 0.5, "top_k": null}').generation_override()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(num_kv_blocks=10, kv_cache_memory_gb=1.0), "num_kv_blocks and kv_cache_memory_gb both size the KV pool"),
        (dict(speculative_config='{"model": "demo", "num_speculative_tokens": 5}', num_speculative_tokens=3),
         "speculative_config says num_speculative_tokens 5 and num_speculative_tokens says 3: give one"),
        # the default given explicitly is given all the same
        (dict(speculative_config='{"model": "demo", "num_speculative_tokens": 3}', num_speculative_tokens=4),
         "speculative_config says num_speculative_tokens 3 and num_speculative_tokens says 4: give one"),
    ],
)  # fmt: skip
def test_two_settings_that_say_different_things_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings)
    spec = '{"model": "demo", "num_speculative_tokens": 5}'
    assert EngineConfig(speculative_config=spec, num_speculative_tokens=5).num_speculative_tokens == 5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ('{"model": "demo", "num_speculative_tokens": 16}', "num_speculative_tokens must be in [1, 15], got 16"),
        ('{"model": "demo", "num_speculative_tokens": 0}', "num_speculative_tokens must be in [1, 15], got 0"),
        ('{"model": ""}', "speculative_config needs the draft's 'model'"),
    ],
)
def test_speculative_config_values_are_refused_naming_it(capsys, spec, message):
    assert cli.main(["generate", "--prompt", "x", "--speculative-config", spec]) == 2
    assert capsys.readouterr().err.startswith("miniserve: error: --speculative-config: ")
    assert EngineConfig(speculative_config='{"model": "demo"}').num_speculative_tokens == 4  # (the default)
    # the flag's own value is the flag's
    argv = ["generate", "--prompt", "x", "--speculative-config", '{"model": "demo"}', "--num-speculative-tokens", "16"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("miniserve: error: --num-speculative-tokens: num_speculative_tokens must")
    with pytest.raises(FileNotFoundError, match=r"draft model directory '/nope' does not exist \(--speculative-config"):
        EngineConfig(speculative_config='{"model": "/nope"}').check_dirs()


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--kv-cache-memory-gb", "1", "--gpu-memory-utilization", "0.5"],
         "--gpu-memory-utilization: does nothing with --kv-cache-memory-gb"),
        (["--num-kv-blocks", "64", "--gpu-memory-utilization", "0.5"],
         "--gpu-memory-utilization: does nothing with --num-kv-blocks"),
        (["--speculative-model", "demo", "--no-async-scheduling"],
         "--async-scheduling: does nothing with --speculative-model"),
        (["--disable-log-stats", "--log-stats-interval", "1"],
         "--log-stats-interval: does nothing with --disable-log-stats"),
        (["--allowed-origins", "", "--allow-credentials"],
         "--allow-credentials: does nothing without --allowed-origins"),
        (["--allowed-origins", "[]", "--allowed-methods", "GET"], "--allowed-methods: does nothing without --allowed-"),
        (["--speculative-model", ""], "--speculative-model: speculative_model must not be empty"),
        (["--tokenizer", " "], "--tokenizer: tokenizer must not be empty"),
    ],
)  # fmt: skip
def test_a_setting_that_another_makes_do_nothing_or_given_empty_is_a_two_line_error(capsys, argv, error):
    """A setting that does nothing beside another (or without it), or a path or name given empty, is an error, not
    a setting dropped unseen; like argparse's own errors, it comes under a one-line usage, not the list of flags."""
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"miniserve: error: {error}") and err.count("\n") == 1, err
    with pytest.raises(SystemExit, match="2"):
        cli.main(["serve", "--max-num-seqs", "many"])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("usage: miniserve serve [MODEL] [options]") and len(lines) == 2, lines
    env = {"MINISERVE_DISABLE_LOG_STATS": "1", "MINISERVE_LOG_STATS_INTERVAL": "1"}
    with pytest.raises(SettingError, match="^MINISERVE_LOG_STATS_INTERVAL='1': does nothing with MINISERVE_DISABLE_L"):
        from_sources(ServerConfig, env=env)


def test_several_served_names_and_api_keys_and_vllms_api_key_variable():
    """vLLM's `--served-model-name A B` and `--api-key K1 K2` (several words), the same as a JSON list in a
    variable; one value is one, whatever it holds (a key with a comma is no two keys); VLLM_API_KEY keys the server
    where no miniserve setting does (a server started as vLLM's ran unkeyed)."""
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--served-model-name", "a", "b", "--api-key", "k1", "k2"])
    server = from_sources(ServerConfig, args, env={})
    assert (server.served_model_names(), server.api_keys()) == (["a", "b"], ["k1", "k2"])
    names = from_sources(ServerConfig, env={"MINISERVE_SERVED_MODEL_NAME": '["a", "b"]'}).served_model_names()
    assert names == ["a", "b"]
    for one in ("s3cret,x", "[abc", "org/m,v2"):
        flagged = from_sources(ServerConfig, parser.parse_args(["serve", "--api-key", one]), env={})
        assert flagged.api_keys() == [one] == from_sources(ServerConfig, env={"MINISERVE_API_KEY": one}).api_keys()
        assert from_sources(ServerConfig, env={"VLLM_API_KEY": one}).api_keys() == [one]
    assert from_sources(ServerConfig, env={"VLLM_API_KEY": "v", "MINISERVE_API_KEY": "m"}).api_keys() == ["m"]
    flagged = from_sources(ServerConfig, parser.parse_args(["serve", "--api-key", "f"]), {"VLLM_API_KEY": "v"})
    assert flagged.api_keys() == ["f"]
    assert from_sources(ServerConfig, env={"VLLM_API_KEY": " "}).api_key is None
    assert "`MINISERVE_API_KEY` (vLLM's `VLLM_API_KEY` too)" in markdown_table()


def test_vllms_spellings_of_numbers_and_flags_and_the_version(capsys):
    """vLLM's command lines as typed: size suffixes on integers (`32k` decimal, `32K` binary), flags with
    underscores, `--version`."""
    parser = cli.build_parser()
    args = parser.parse_args(cli.dashed(["serve", "--max_model_len", "2k", "--max-num-batched-tokens=8K"]))
    config = from_sources(EngineConfig, args, env={})
    assert (config.max_model_len, config.max_num_batched_tokens) == (2000, 8192)
    assert from_sources(EngineConfig, env={"MINISERVE_MAX_MODEL_LEN": "1.5k"}).max_model_len == 1500
    with pytest.raises(SettingError, match="MINISERVE_MAX_MODEL_LEN='1.5K': must be an integer"):
        from_sources(EngineConfig, env={"MINISERVE_MAX_MODEL_LEN": "1.5K"})  # (a binary size is whole)
    assert cli.dashed(["--served_model_name", "my_model", "--x_y=a_b", "-n", "--prompt", "--my_var is x"]) == [
        "--served-model-name", "my_model", "--x-y=a_b", "-n", "--prompt", "--my_var is x"
    ]  # fmt: skip
    assert cli.dashed(["--stop=--end_of_turn", "--", "--a_b"]) == ["--stop=--end_of_turn", "--", "--a_b"]
    with pytest.raises(SystemExit, match="0"):
        cli.main(["--version"])
    from miniserve import __version__

    assert capsys.readouterr().out == f"miniserve {__version__}\n"


def test_variable_warnings_are_named_with_the_setting_they_may_mean(monkeypatch, capsys):
    """A typo such as MINISERVE_APIKEY would leave the server without its key, unseen: each one is a warning."""
    env = {"MINISERVE_APIKEY": "k", "MINISERVE_API_KEY": "k", "MINISERVE_COMMIT": "abc", "HOME": "/", "MINISERVE_X": ""}
    assert variable_warnings(env) == [
        "MINISERVE_APIKEY is not a miniserve setting: ignored (did you mean MINISERVE_API_KEY?)",
        "MINISERVE_X is not a miniserve setting: ignored",
    ]
    # a blank setting is unset, said so: MINISERVE_API_KEY="$KEY" with KEY unset would serve without a key unseen
    blank = {"MINISERVE_API_KEY": " ", "MINISERVE_PORT": "", "MINISERVE_COMMIT": "", "MINISERVE_SEED": "3"}
    assert variable_warnings(blank) == [
        "MINISERVE_API_KEY is set but empty: ignored (the setting keeps its default)",
        "MINISERVE_PORT is set but empty: ignored (the setting keeps its default)",
    ]
    monkeypatch.setenv("MINISERVE_BLOCKSIZE", "12")
    assert cli.main(["generate", "--prompt", "x", "--block-size", "12"]) == 2
    warning = "MINISERVE_BLOCKSIZE is not a miniserve setting: ignored (did you mean MINISERVE_BLOCK_SIZE?)"
    assert capsys.readouterr().err.splitlines()[0] == f"miniserve: warning: {warning}"
    logged = []
    monkeypatch.setattr(logging.getLogger("uvicorn.error"), "warning", lambda fmt, *a: logged.append(fmt % a))
    settings_from_env({"MINISERVE_MAX_WAITNG": "3"})
    assert logged == ["MINISERVE_MAX_WAITNG is not a miniserve setting: ignored (did you mean MINISERVE_MAX_WAITING?)"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("config.json", "{bad", "config.json is not valid JSON"),
        ("config.json", "[1]", "config.json must hold a JSON object, not list"),
        ("tokenizer_config.json", "{bad", "tokenizer_config.json is not valid JSON"),
        ("generation_config.json", "[]", "generation_config.json must hold a JSON object, not list"),
    ],
)
def test_a_broken_json_file_is_one_line_naming_it(tmp_path, capsys, name, content, message):
    import shutil

    from miniserve.config import DEMO_TARGET

    model = tmp_path / "model"
    shutil.copytree(DEMO_TARGET, model)
    (model / name).write_text(content)
    assert cli.main(["generate", "--prompt", "x", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"miniserve: error: {model / name}") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tokenizer.json", "not a tokenizer the tokenizers library reads"),
        ("model.safetensors", "cannot be read as a safetensors checkpoint"),
        ("tokenizer.model", "not a SentencePiece model"),  # (with no tokenizer.json beside it)
    ],
)
def test_a_damaged_model_file_is_one_line_naming_it(tmp_path, capsys, name, message):
    """A cut download or a stray file is named in one line, not a traceback from the library that read it."""
    import shutil

    from miniserve.config import DEMO_TARGET

    model = tmp_path / "model"
    shutil.copytree(DEMO_TARGET, model)
    good = (model / name).read_bytes() if (model / name).exists() else b""
    (model / name).write_bytes(good[: len(good) // 2] if name == "model.safetensors" else b"\xff{bad")
    if name == "tokenizer.model":
        (model / "tokenizer.json").unlink()
    assert cli.main(["generate", "--prompt", "x", "--model", str(model), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"miniserve: error: {model / name}: {message}") and err.count("\n") == 1, err


def test_a_chat_template_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "t.jinja").write_bytes(b"\xff{{ x }}")
    with pytest.raises(ValueError, match=f"chat template file '{tmp_path / 't.jinja'}' is not UTF-8 text"):
        EngineConfig(chat_template=str(tmp_path / "t.jinja")).check_dirs()


def test_generate_checks_its_sampling_flags_before_loading_and_stops_quietly_on_ctrl_c(monkeypatch, capsys):
    from miniserve.engine.llm_engine import LLMEngine

    # the pool's budget would fail the load: the flag's error comes first, naming the flag
    assert cli.main(["generate", "--prompt", "x", "--temperature", "-1", "--kv-cache-memory-gb", "1e-9"]) == 2
    assert capsys.readouterr().err == "miniserve: error: --temperature: temperature must be in [0.0, inf], got -1.0\n"
    assert cli.main(["generate", "--prompt", "x", "--sampling-seed", "99999999999999999999"]) == 2
    assert capsys.readouterr().err.startswith("miniserve: error: --sampling-seed: seed must be in")

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(LLMEngine, "step", interrupted)
    assert cli.main(["generate", "--prompt", "x"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_uvicorn_with_a_bad_variable_prints_one_line(tmp_path):
    env = {**os.environ, "MINISERVE_MAX_NUM_SEQS": "many"}
    cmd = [sys.executable, "-m", "uvicorn", "server:app", "--port", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "miniserve: error: MINISERVE_MAX_NUM_SEQS='many': must be an integer"


def test_a_metrics_directory_that_is_gone_is_one_line_before_the_load(tmp_path):
    """prometheus_client writes into PROMETHEUS_MULTIPROC_DIR: one that is not there failed the server only once
    the model had loaded, with a traceback; now uvicorn and `miniserve serve` say so first, in one line."""
    gone = str(tmp_path / "gone")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": gone}
    expected = f"miniserve: error: PROMETHEUS_MULTIPROC_DIR={gone!r} is not a directory"
    for cmd in (
        [sys.executable, "-m", "uvicorn", "server:app", "--port", "0"],
        [sys.executable, "-m", "miniserve.cli", "serve", "--port", "0", "--device", "cpu"],
        [sys.executable, "-m", "miniserve.cli", "serve", "--port", "0", "--device", "cpu", "--api-servers", "2"],
    ):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0, proc.stderr
        assert proc.stderr.strip().startswith(expected) and "\n" not in proc.stderr.strip(), proc.stderr


def test_a_metrics_directory_with_an_earlier_runs_files_is_a_warning(tmp_path):
    from miniserve.server.metrics import check_shared_dir

    assert check_shared_dir({}) is None and check_shared_dir({"PROMETHEUS_MULTIPROC_DIR": ""}) is None
    assert check_shared_dir({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}) is None  # empty: as it should be
    (tmp_path / "counter_123.db").write_bytes(b"")
    (tmp_path / "histogram_123.db").write_bytes(b"")
    warning = check_shared_dir({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert "holds 2 metrics files of an earlier run" in warning
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        check_shared_dir({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "counter_123.db")})


@pytest.mark.parametrize("setting", ["model", "speculative_model", "tokenizer"])
def test_every_model_path_error_says_which_directory(tmp_path, setting):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    what = {"model": "model directory", "speculative_model": "draft model directory"}.get(
        setting, "tokenizer directory"
    )
    for path, problem in ((tmp_path / "nope", "does not exist"), (not_a_dir, "is not a directory")):
        with pytest.raises(FileNotFoundError) as info:
            EngineConfig(**{setting: str(path)}).check_dirs()
        assert str(info.value).startswith(f"{what} '{path}' {problem}")
        assert "MINISERVE_" + setting.upper() in str(info.value)
    if setting != "tokenizer":
        with pytest.raises(FileNotFoundError, match=f"{what} '{tmp_path}' has no config.json"):
            EngineConfig(**{setting: str(tmp_path)}).check_dirs()
    # a model without a tokenizer (and no --tokenizer), or a tokenizer directory without one, fails before loading
    if setting != "speculative_model":  # (a draft uses the target's tokenizer)
        (tmp_path / "config.json").write_text("{}")
        with pytest.raises(FileNotFoundError, match=f"{what} '{tmp_path}' has no tokenizer.json or tokenizer.model"):
            EngineConfig(**{setting: str(tmp_path)}).check_dirs()
        (tmp_path / "tokenizer.model").write_bytes(b"")
        EngineConfig(**{setting: str(tmp_path)}).check_dirs()  # either file is enough


@pytest.mark.parametrize(
    "cls,name,value,message",
    [
        (EngineConfig, "max_num_seqs", 2.5, "max_num_seqs must be an integer, got 2.5"),
        (EngineConfig, "block_size", "16", "block_size must be an integer, got '16'"),
        (EngineConfig, "num_kv_blocks", 10.5, "num_kv_blocks must be an integer or None, got 10.5"),
        (EngineConfig, "enable_prefix_caching", "false", "enable_prefix_caching must be true or false, got 'false'"),
        (EngineConfig, "enforce_eager", 0, "enforce_eager must be true or false, got 0"),
        (EngineConfig, "max_num_seqs", True, "max_num_seqs must be an integer, got True"),
        (EngineConfig, "gpu_memory_utilization", "0.5", "gpu_memory_utilization must be a number, got '0.5'"),
        (EngineConfig, "kv_cache_memory_gb", "1", "kv_cache_memory_gb must be a number or None, got '1'"),
        (EngineConfig, "model", 5, "model must be a string or None, got 5"),
        (ServerConfig, "port", "8000", "port must be an integer, got '8000'"),
        (ServerConfig, "drain_timeout", None, "drain_timeout must be a number, got None"),
    ],
)
def test_a_python_callers_setting_of_the_wrong_type_is_refused_by_name(cls, name, value, message):
    """Flags and variables are parsed to each field's type; a Python caller's values are checked against it, not
    left to fail in the engine (a float block count in torch.zeros, the string "false" read as true)."""
    from miniserve.config import SettingError

    with pytest.raises(SettingError, match=f"^{re.escape(message)}$") as caught:
        cls(**{name: value})
    assert caught.value.name == name


def test_numbers_and_paths_that_fit_a_field_are_taken():
    import numpy as np
    import torch

    from miniserve.config import DEMO_TARGET, SettingError

    config = EngineConfig(model=DEMO_TARGET, gpu_memory_utilization=1, kv_cache_memory_gb=2)  # a Path, ints
    assert config.model == str(DEMO_TARGET) and config.gpu_memory_utilization == 1
    numpy = EngineConfig(max_num_seqs=np.int64(4), gpu_memory_utilization=np.float32(0.5))
    assert (type(numpy.max_num_seqs), type(numpy.gpu_memory_utilization)) == (int, float)  # stored as Python's
    assert ServerConfig(drain_timeout=0).drain_timeout == 0
    for seed in (-(2**63), 2**64 - 1):  # torch.manual_seed's whole range, and one past each end refused
        assert EngineConfig(seed=seed).seed == seed and torch.manual_seed(seed).initial_seed() == seed % 2**64
    for seed in (-(2**63) - 1, 2**64):
        with pytest.raises(SettingError, match=re.escape(f"seed must be in [-2**63, 2**64-1], got {seed}")):
            EngineConfig(seed=seed)
        with pytest.raises((RuntimeError, ValueError)):  # torch's own bounds, the oracle of the ones above
            torch.manual_seed(seed)
    torch.seed()


def test_dtype_takes_vllms_spellings_and_torch_dtypes():
    """vLLM's `dtype` also takes "half", "float" and torch dtypes; each is the dtype it names, and the KV cache dtype
    takes a torch dtype too. Oracle: the model's parameters and the KV pool's dtype."""
    import torch

    from miniserve import LLM

    for dtype, kv, want, want_kv in (
        ("half", "auto", torch.float16, torch.float16),
        ("float", torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.bfloat16, "auto", torch.bfloat16, torch.bfloat16),
    ):
        llm = LLM(dtype=dtype, kv_cache_dtype=kv, num_kv_blocks=8, max_num_seqs=2)
        target = llm.engine.target
        assert (next(target.model.parameters()).dtype, target.kv_dtype) == (want, want_kv), dtype
        llm.shutdown()
    with pytest.raises(ValueError, match="^dtype must be one of auto, float32, .*, half, float; got 'int8'$"):
        EngineConfig(dtype=torch.int8)


def test_a_kv_pool_larger_than_the_machine_is_refused_by_name():
    import torch

    from miniserve.config import SettingError
    from miniserve.engine.capacity import check_fits

    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    check_fits(memory // 4096, 4096, torch.device("cpu"))  # exactly all of it (the check, not an allocation)
    with pytest.raises(SettingError, match=r"num_kv_blocks=\d+ needs .* GiB of KV cache .* of memory on this machine"):
        check_fits(memory // 4096 + 1, 4096, torch.device("cpu"))
    code = "from miniserve import cli; raise SystemExit(cli.main(['generate', '--prompt', 'x', '--device', 'cpu', " \
        f"'--num-kv-blocks', '{memory}']))"  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith(f"miniserve: error: num_kv_blocks={memory} needs "), run.stderr


def test_python_dash_m_miniserve_is_the_command():
    run = subprocess.run([sys.executable, "-m", "miniserve", "generate", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--prompt" in run.stdout and run.stdout == cli_help("generate")


def cli_help(command: str) -> str:
    run = subprocess.run([sys.executable, "-m", "miniserve.cli", command, "--help"], capture_output=True, text=True)
    return run.stdout


def test_readme_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme, "run scripts/update_readme_settings.py"
    script = [sys.executable, str(REPO / "scripts" / "update_readme_settings.py"), "--check"]
    assert subprocess.run(script, capture_output=True).returncode == 0  # (and README.md left as it is)
    for cls in (EngineConfig, ServerConfig):
        for f in fields(cls):
            assert f"`MINISERVE_{f.name.upper()}`" in readme


@pytest.mark.parametrize("value", [[2, None], "2", [True], -1, 2.5])
def test_a_malformed_generation_config_eos_token_id_is_named(tmp_path, value):
    """generation_config.json's eos_token_id, read beside a separate tokenizer: a value that is no token id (nor a
    list of them) is named with its file (it was a TypeError from int(), or silently no stop token)."""
    from miniserve.models.generation_config import eos_token_ids

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be a token id"):
        eos_token_ids(tmp_path, "auto")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert eos_token_ids(tmp_path, "auto") == {2, 7}
