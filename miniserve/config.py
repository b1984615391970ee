"""Every setting in one place: `EngineConfig` (what the engine runs) and `ServerConfig` (what only the HTTP
server reads), and how the device-dependent ones ("auto" device, dtype, KV-cache dtype) resolve to torch objects.

Each field carries its help text and choices in its metadata. The command-line flags of `miniserve serve` and
`miniserve generate`, the MINISERVE_* environment variables and the README's settings table are generated from
them (settings.py), so a setting is written once: add a field here and it is reachable everywhere.
"""

from __future__ import annotations

import functools
import json
import numbers
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from miniserve.sampling_params import SamplingParams

DEMO_DIR = Path(__file__).parent / "demo_models"
DEMO_TARGET = DEMO_DIR / "shakespeare-target"
DEMO_DRAFT = DEMO_DIR / "shakespeare-draft"

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e4m3fnuz", "bfloat16", "float16", "float32")
DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float")  # half, float: vLLM's spellings
ATTENTION_BACKENDS = ("auto", "triton", "torch")
# how message content reaches a chat template: text, OpenAI's list of parts, or whichever the template reads
CONTENT_FORMATS = ("auto", "string", "openai")  # (chat_template.py: detect_content_format)
FP8_DECODES = ("auto", "hw", "hw-staged")  # kernels/decode_attention.py FP8_DECODES that a user may pick
DECODE_SPLITS = ("by-length", "by-batch")  # kernels/decode_attention.py split_tokens_for
DEPENDENT_LAUNCHES = ("auto", "off")  # kernels/dependent_launch.py
GENERATION_CONFIGS = ("auto", "vllm")  # or a directory holding generation_config.json (models/generation_config.py)
# the sampling keys of generation_config.json (and override_generation_config) -> SamplingParams' names, as vLLM
# reads them (models/generation_config.py)
GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
MAX_SPECULATIVE_TOKENS = 15  # k+1 <= 16 tokens a sequence: engine/model_runner.py DECODE_QUERIES_MAX_LEN
DEFAULT_SPECULATIVE_TOKENS = 4
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
REASONING_PARSERS = ("qwen3", "deepseek_r1")  # server/reasoning.py: how each reads a thinking model's output
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "mistral", "qwen3_coder")  # server/tool_calls.py PARSERS
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"half": torch.float16, "float": torch.float32}  # `dtype` as vLLM also spells it


class SettingError(ValueError):
    """A bad value for one setting. `name` is the field, so whoever read the value can name its flag or variable."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def setting(
    default,
    help: str,
    choices: tuple[str, ...] | None = None,
    shown_default: str | None = None,
    needs: str = "",
    vllm_flag: str = "",
    vllm_off_flag: str = "",
    ignored_with: tuple[str, ...] = (),
    several: bool = False,
    vllm_env: str = "",
):
    """A dataclass field with what the CLI, the environment and the docs need to know about it; `needs`: the
    setting without which this one does nothing (given alone as a flag or variable, it is an error);
    `ignored_with`: settings beside which this one does nothing (given with one, an error too); `vllm_flag`:
    vLLM's name for the flag, where it differs, taken too (a `vllm serve` command line works as written);
    `vllm_off_flag`: vLLM's flag that turns this switch off; `several`: a list (several words after the flag, as
    vLLM's; a JSON list in a variable, several_values); `vllm_env`: vLLM's variable for it, read after miniserve's."""
    meta = {"help": help, "choices": choices, "shown_default": shown_default, "needs": needs}
    meta |= {"vllm_flag": vllm_flag, "vllm_off_flag": vllm_off_flag, "ignored_with": ignored_with}
    meta |= {"several": several, "vllm_env": vllm_env}
    return field(default=default, metadata=meta)


@dataclass
class EngineConfig:
    """What the engine runs: the models, their dtypes, the KV pool, batching and speculative decoding."""

    model: str | None = setting(None, "Hugging Face model directory", shown_default="the embedded demo model")
    tokenizer: str | None = setting(None, "tokenizer directory", shown_default="the model directory")
    chat_template: str | None = setting(
        None,
        "a Jinja chat template used instead of the tokenizer's (as vLLM's --chat-template): a file's path, or the "
        "template itself",
        shown_default="the tokenizer's",
    )
    chat_template_content_format: str = setting(
        "auto",
        "how a message's content reaches the chat template (vLLM's): string = its text (text parts joined with "
        "newlines), openai = a list of {type: text, text} parts, auto = openai where the template loops over a "
        "message's content",
        CONTENT_FORMATS,
    )
    dtype: str = setting(
        "auto", "weights and activations; auto = the checkpoint's dtype on a GPU, float32 on the CPU", DTYPES
    )
    kv_cache_dtype: str = setting(
        "auto",
        "KV cache dtype; auto = the model dtype, fp8/fp8_e4m3 = float8_e4m3fn (e4m3fnuz on MI300)",
        KV_CACHE_DTYPES,
    )
    device: str = setting("auto", "cuda, cuda:N or cpu; auto = cuda if available, else cpu")
    attention_backend: str = setting(
        "auto", "kernels: auto = Triton on CUDA/ROCm, the torch reference on the CPU", ATTENTION_BACKENDS
    )
    fp8_decode: str = setting(
        "auto",
        "how attention reads an FP8 KV cache; every mode reads the reference's values bit for bit; auto = on NVIDIA "
        "the decode kernel reads V in byte pairs (fastest: the README's Performance section); hw = V gathered byte "
        "by byte (the default before, e4m3fn on NVIDIA; a few attention outputs differ from auto by one bf16 ulp); "
        "hw-staged = V staged through shared memory (e4m3fn on NVIDIA, slower than auto)",
        FP8_DECODES,
    )
    decode_splits: str = setting(
        "by-length",
        "how decode attention splits each context over GPU programs; by-length = by the sequence's length alone, so "
        "a sequence's attention never depends on its batch (and greedy speculative verification matches plain "
        "decoding); by-batch = many short splits at small batches, one long one at large batches (faster: the "
        "README's Performance section), results differ between batch sizes in the last bits",
        DECODE_SPLITS,
    )
    dependent_launch: str = setting(
        "auto",
        "auto = on NVIDIA Hopper and newer GPUs, passes of up to 64 tokens (decode steps of batches up to 64) launch "
        "a decoder layer's kernels but the extend attention kernel as programmatic dependents (each starts while "
        "the one before finishes) and run its projections on miniserve's Triton GEMM, which can be launched so, "
        "instead of cuBLAS (faster at batch 1 and "
        "64: the README's Performance section; outputs differ from off in the last bits); off = ordinary launches and "
        "cuBLAS",
        DEPENDENT_LAUNCHES,
    )
    block_size: int = setting(16, "tokens per KV block (a power of two)")
    num_kv_blocks: int | None = setting(
        None,
        "KV pool size in blocks",
        shown_default="from the memory budget, at most what max_num_seqs sequences of max_model_len tokens use",
    )
    kv_cache_memory_gb: float | None = setting(
        None,
        "KV pool budget in GiB",
        shown_default="on a GPU, the free memory gpu_memory_utilization leaves; 1 GiB on the CPU",
    )
    gpu_memory_utilization: float = setting(
        0.9,
        "the KV pool takes free GPU memory until this fraction of the GPU's memory is in use (the weights and other "
        "processes count; CUDA graphs are captured after it, on top), in (0, 1]",
        ignored_with=("num_kv_blocks", "kv_cache_memory_gb"),
    )
    max_num_seqs: int = setting(256, "sequences decoded together (as vLLM; the KV pool caps what runs at once)")
    max_num_batched_tokens: int = setting(8192, "new tokens per step: prompt chunks up to this size")
    max_model_len: int | None = setting(
        None,
        "context length (prompt + completion)",
        shown_default="the model's max_position_embeddings (x a linear RoPE factor; with yarn "
        "original_max_position_embeddings x its factor)",
    )
    max_stop_strings: int = setting(32, "stop strings per request (OpenAI allows 4); a longer list is refused")
    max_stop_string_length: int = setting(256, "characters per stop string")
    max_bad_words: int = setting(256, "bad_words per request (each is matched at every step); a longer list is refused")
    max_logprobs: int = setting(
        20, "top logprobs a token may ask for (logprobs, prompt_logprobs; vLLM's); -1: the whole vocabulary"
    )
    grammar_threads: int = setting(
        0,
        "threads xgrammar fills a step's structured-output token masks on, while one thread would take 0.5 ms or more; "
        "0 = half the CPUs, at most 4",
    )
    seed: int | None = setting(
        0, "seed of the RNG that requests without their own seed sample from (LLM(seed=None): a random one each run)"
    )
    generation_config: str = setting(
        "auto",
        "sampling defaults: auto = the model's generation_config.json (temperature, top_p, top_k, min_p, "
        "repetition_penalty; max_new_tokens caps max_tokens) for LLM.generate without sampling params and for request "
        "fields left unset, as vLLM; vllm = vLLM's own defaults; a directory = its generation_config.json (whose "
        "eos_token_id then stops too)",
    )
    override_generation_config: str | None = setting(
        None,
        "a JSON object of sampling defaults (the keys of generation_config.json above, e.g. '{\"temperature\": 0.5}') "
        "merged over the model's (auto) or used alone (vllm), as vLLM's --override-generation-config",
        shown_default="none",
    )
    speculative_model: str | None = setting(
        None,
        "draft model directory for speculative decoding (same tokenizer); demo = the demo draft",
        shown_default="off",
    )
    num_speculative_tokens: int | None = setting(
        None, f"tokens the draft proposes per speculative round (at most {MAX_SPECULATIVE_TOKENS})",
        shown_default=str(DEFAULT_SPECULATIVE_TOKENS), needs="speculative_model",
    )  # fmt: skip
    speculative_config: str | None = setting(
        None,
        'vLLM\'s form of the two settings above, a JSON object: \'{"model": DIR, "num_speculative_tokens": 4}\' '
        "(method draft_model, the one offered)",
        shown_default="none",
    )
    speculative_kv_cache_dtype: str | None = setting(
        None, "the draft's KV cache dtype", KV_CACHE_DTYPES, shown_default="kv_cache_dtype", needs="speculative_model"
    )
    scheduling_policy: str = setting(
        "fcfs",
        "which waiting request starts first, and which running one is preempted first when the KV pool runs dry "
        "(vLLM's): fcfs = by arrival; priority = by the request's priority (lower first), then arrival",
        ("fcfs", "priority"),
    )
    enable_prefix_caching: bool = setting(
        True, "reuse the KV blocks of prompt prefixes computed before (off: every prompt is computed from scratch)"
    )
    tensor_parallel_size: int = setting(
        1,
        "GPUs the target model is split over (Megatron tensor parallelism, one process each; under torchrun, "
        "every rank runs the same command)",
        vllm_flag="-tp",
    )
    enforce_eager: bool = setting(
        False,
        "never replay CUDA graphs (on a GPU, decode steps, short prompt passes and speculative rounds replay them)",
    )
    overlap_spec_rounds: bool = setting(
        True, "launch the next greedy speculative round before the host has read this one", needs="speculative_model"
    )
    async_scheduling: bool = setting(
        True,
        "plain decoding: launch the next decode step before the host has read this one (speculative decoding has "
        "overlap_spec_rounds)",
        ignored_with=("speculative_model",),
    )

    def __post_init__(self) -> None:
        self._take_speculative_config()  # (its values are checked below with the settings it sets)
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = DEFAULT_SPECULATIVE_TOKENS
        check_types(self)
        if self.model is None:
            self.model = str(DEMO_TARGET)
        if self.speculative_model == "demo":
            self.speculative_model = str(DEMO_DRAFT)
        check_choices(self)
        _check_engine_values(self)

    def check_dirs(self) -> None:
        """Fail early, naming the setting to fix, when a model or tokenizer directory is missing or is not one
        (every entry point, the CLI, `LLM` and the server, goes through here before loading anything)."""
        if self.model == str(DEMO_TARGET) and not DEMO_TARGET.is_dir():
            raise FileNotFoundError(
                f"no model configured and the embedded demo model directory is missing ({DEMO_TARGET}); "
                "set --model or MINISERVE_MODEL to a Hugging Face model directory"
            )
        _check_dir("model", self.model, "model directory", "config.json")
        if self.speculative_model:
            given_as = "speculative_config" if self.speculative_config is not None else "speculative_model"
            _check_dir(given_as, self.speculative_model, "draft model directory", "config.json")
        if self.tokenizer:
            _check_dir("tokenizer", self.tokenizer, "tokenizer directory", None)
        if self.generation_config not in GENERATION_CONFIGS:
            what = "generation_config (auto, vllm, or a directory holding generation_config.json)"
            _check_dir("generation_config", self.generation_config, what, "generation_config.json")
        resolve_chat_template(self.chat_template)
        tokenizer = Path(self.tokenizer or self.model)
        if not any((tokenizer / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            name = "tokenizer" if self.tokenizer else "model"
            raise FileNotFoundError(
                f"{name} directory {str(tokenizer)!r} has no tokenizer.json or tokenizer.model "
                "(--tokenizer / MINISERVE_TOKENIZER names a directory that has one)"
            )

    def generation_override(self) -> dict[str, Any]:
        """override_generation_config as a dict (_checked_override)."""
        return _checked_override(self.override_generation_config)

    def _take_speculative_config(self) -> None:
        """vLLM's speculative_config, a JSON object, as speculative_model and num_speculative_tokens."""
        if self.speculative_config is None:
            return
        try:
            values = speculative_settings(json_object("speculative_config", self.speculative_config))
        except ValueError as exc:
            raise SettingError("speculative_config", str(exc)) from None
        if self.speculative_model is not None:
            raise SettingError(
                "speculative_config", "speculative_config and speculative_model both name a draft model: give one"
            )
        self.speculative_model = values["speculative_model"]
        tokens = values.get("num_speculative_tokens")
        if tokens is not None and not 1 <= tokens <= MAX_SPECULATIVE_TOKENS:  # (the flag's: checked as the flag's)
            raise SettingError(
                "speculative_config",
                f"speculative_config: num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {tokens}",
            )
        self.num_speculative_tokens = _speculative_tokens(values, self.num_speculative_tokens)

    @property
    def kv_lookahead(self) -> int:
        """KV slots past a sequence's length that a decode step may write: none without a draft; k for a
        speculative round; 2k+1 when the next round is launched before this one's result is known (it starts up
        to k+1 tokens further and writes k more)."""
        if not self.speculative_model:
            return 0
        k = self.num_speculative_tokens
        return 2 * k + 1 if self.overlap_spec_rounds else k


@dataclass
class ServerConfig:
    """What only the HTTP server reads: `miniserve serve` flags, or the environment of `uvicorn server:app`
    (where host, port and log level are uvicorn's own flags, and the connection settings need
    `--http server:http`)."""

    served_model_name: str | None = setting(
        None,
        "the model name clients send; several (words after the flag, a JSON list in the variable) serve it under "
        "each, the first in responses (as vLLM's)",
        shown_default="the model directory's name (the --model path as given is taken too, as vLLM names it)",
        several=True,
    )
    api_key: str | None = setting(
        None,
        "require 'Authorization: Bearer KEY' on every /v1 route (any of several keys, given as served_model_name's)",
        shown_default="off",
        several=True,
        vllm_env="VLLM_API_KEY",
    )
    max_waiting: int = setting(
        1024,
        "503 for a request that would make more sequences than this wait beyond max_num_seqs (400 for one that "
        "could not fit even on an idle server; counted across every API server)",
    )
    max_body_bytes: int = setting(4 << 20, "larger request bodies get 413", shown_default="4 MiB")
    max_prompts_per_request: int = setting(1024, "a /v1/completions prompt list longer than this gets 400")
    max_prompt_chars: int = setting(
        1 << 20, "longer text prompts (a chat: as rendered) get 400 before tokenizing", shown_default="1 Mi"
    )
    trust_request_chat_template: bool = setting(
        False,
        "accept a request's own chat_template, as vLLM's --trust-request-chat-template: a template is code the "
        "server runs (the sandbox bounds what it reaches, not how long it loops); off: such requests get 400",
    )
    max_prompt_tokens: int | None = setting(None, "tokens of a prompt; 400 beyond", shown_default="max_model_len")
    reasoning_parser: str | None = setting(
        None,
        "split a thinking model's chat output into reasoning (between `<think>` and `</think>`) and content, as "
        "vLLM's --reasoning-parser: qwen3 (none with chat_template_kwargs enable_thinking false), deepseek_r1",
        REASONING_PARSERS,
        shown_default="off",
    )
    enable_auto_tool_choice: bool = setting(
        True,
        "tool_choice auto (also tools without tool_choice) parses the calls the model writes, as vLLM's "
        "--enable-auto-tool-choice; off: such requests get 400 naming tool_choice, as vLLM without it "
        "(required and a named function work either way)",
    )
    tool_call_parser: str = setting(
        "auto",
        "the format tool calls are parsed in, as vLLM's --tool-call-parser; auto reads it off the chat template "
        "(<tool_call> blocks: hermes, with <function=: qwen3_coder; [TOOL_CALLS]: mistral; Llama 3.1's ipython "
        "role or <|python_tag|>: llama3_json)",
        TOOL_CALL_PARSERS,
    )
    response_role: str = setting(
        "assistant",
        "the role of a chat reply, as vLLM's --response-role (a request with add_generation_prompt false continues "
        "its last message's role instead); chat echo repeats the last message when it has the reply's role",
    )
    return_tokens_as_token_ids: bool = setting(
        False,
        "logprobs name their tokens 'token_id:<id>' unless a request says otherwise (its return_tokens_as_token_ids), "
        "as vLLM's --return-tokens-as-token-ids: every token identifiable, a partial UTF-8 byte too",
    )
    enable_force_include_usage: bool = setting(
        False,
        "every stream ends with a usage chunk, as if it asked for stream_options include_usage, as vLLM's "
        "--enable-force-include-usage (usage on every chunk still needs continuous_usage_stats)",
    )
    enable_request_id_headers: bool = setting(
        False,
        "answer every request with an X-Request-Id header, as vLLM's --enable-request-id-headers: the request's own "
        "X-Request-Id, else a new id",
    )
    enable_log_requests: bool = setting(
        False,
        "log each request as it is posted: its id, prompt (text and token ids) and sampling parameters, as vLLM's "
        "--enable-log-requests",
        vllm_off_flag="--disable-log-requests",
    )
    max_log_len: int | None = setting(
        None,
        "characters of prompt text, and token ids, that a request's log line shows",
        shown_default="all",
        needs="enable_log_requests",
    )
    disable_log_stats: bool = setting(
        False, "no periodic engine lines in the log (the next setting's), as vLLM's --disable-log-stats"
    )
    log_stats_interval: float = setting(
        10.0,
        "seconds between the log's engine lines, as vLLM's: prompt and generation throughput over the interval, "
        "sequences running and waiting, KV cache usage, the prefix cache's hit rate, speculative decoding's "
        "acceptance (an idle server's at debug level)",
        ignored_with=("disable_log_stats",),
    )
    drain_timeout: float = setting(
        5.0,
        "after SIGTERM/SIGINT, seconds requests may still finish; then streams end with finish_reason abort, "
        "others get 503; a second signal exits at once",
    )
    stream_stall_timeout: float = setting(30.0, "abort a stream whose client has not read it for this many seconds")
    header_timeout: float = setting(
        10.0, "seconds for a request's head, from connect or the last response (408, close)"
    )
    body_timeout: float = setting(60.0, "seconds for a request's body, from the end of its head (408, close)")
    keep_alive_timeout: float = setting(5.0, "seconds an idle keep-alive connection stays open")
    write_timeout: float = setting(
        60.0,
        "seconds an answer may wait on a client that does not read it (the socket's buffers full: it takes "
        "nothing more), as nginx's send_timeout; then the connection is dropped, and what was queued for it freed",
    )
    max_connections: int | None = setting(
        1024, "connections beyond this get 503 and are closed (/health, /ping and /metrics are still answered)"
    )
    http_parser: str = setting(
        "httptools",
        "HTTP/1.1 parser (uvicorn's --http): httptools (C) costs less per request and per streamed event than h11 "
        "(pure Python)",
        ("httptools", "h11"),
    )
    api_servers: int = setting(
        1,
        "HTTP server processes sharing the one engine (miniserve serve only): "
        "each parses, detokenizes and streams its own connections, so more streams keep up with the engine; they "
        "admit against one count of max_num_seqs and max_waiting, and the connection limit applies to each",
        vllm_flag="--api-server-count",
    )
    allowed_origins: str = setting(
        "*",
        "origins whose web pages may call the server from a browser (CORS), as vLLM's --allowed-origins: * for any, "
        "or a list (comma-separated, or JSON as vLLM takes it); an empty list ([], or '' as a flag): no CORS headers "
        "(browsers then refuse pages of other origins)",
    )
    allowed_methods: str = setting(
        "*", "HTTP methods such a page may use (CORS; * or a list, as allowed_origins)", needs="allowed_origins"
    )
    allowed_headers: str = setting(
        "*", "request headers such a page may send (CORS; * or a list, as allowed_origins)", needs="allowed_origins"
    )
    allow_credentials: bool = setting(
        False,
        "let such pages send cookies and HTTP authentication (CORS's Access-Control-Allow-Credentials)",
        needs="allowed_origins",
    )
    ssl_certfile: str | None = setting(
        None,
        "serve HTTPS with this certificate (chain) file, as vLLM's --ssl-certfile (under uvicorn: its own "
        "--ssl-certfile)",
        shown_default="off: HTTP",
    )
    ssl_keyfile: str | None = setting(
        None,
        "the certificate's private key file, unless the certificate file holds it",
        shown_default="none",
        needs="ssl_certfile",
    )
    root_path: str | None = setting(
        None,
        "the path prefix a proxy serves the API under (e.g. /api), as vLLM's --root-path: requests come with it "
        "(/api/v1/models) or without it (a proxy that strips it), and the OpenAPI docs link through it",
        shown_default="none",
    )
    disable_fastapi_docs: bool = setting(
        False, "no /docs, /redoc and /openapi.json (the OpenAPI schema pages), as vLLM's --disable-fastapi-docs"
    )
    host: str = setting("127.0.0.1", "bind address (0.0.0.0 exposes the server)")
    port: int = setting(8000, "TCP port")
    log_level: str = setting("info", "server log level", LOG_LEVELS, vllm_flag="--uvicorn-log-level")
    access_log: bool = setting(
        True,
        "log a line per HTTP request (uvicorn's access log); --no-access-log saves its cost at high request rates",
        vllm_off_flag="--disable-uvicorn-access-log",
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_choices(self)
        if self.api_key is not None and not several_values(self.api_key):
            raise SettingError("api_key", "api_key must not be empty: leave it unset to serve without a key")
        if self.root_path is not None and not (self.root_path.startswith("/") and not self.root_path.endswith("/")):
            raise SettingError(
                "root_path", f"root_path must start with '/' and not end with one (e.g. /api), got {self.root_path!r}"
            )
        if not self.response_role.strip():
            raise SettingError("response_role", "response_role must not be empty")
        if self.served_model_name is not None and not several_values(self.served_model_name):
            raise SettingError(
                "served_model_name", "served_model_name must not be empty: leave it unset for the model's"
            )
        _check_min("max_waiting", self.max_waiting, 0)
        _check_min("api_servers", self.api_servers, 1)
        for name in ("max_body_bytes", "max_prompts_per_request", "max_prompt_chars"):
            _check_min(name, getattr(self, name), 1)
        for name in ("max_connections", "max_prompt_tokens", "max_log_len"):
            if getattr(self, name) is not None:
                _check_min(name, getattr(self, name), 1)
        for name in ("drain_timeout", "stream_stall_timeout"):
            if not getattr(self, name) >= 0:
                raise SettingError(name, f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout", "write_timeout", "log_stats_interval"):
            if not getattr(self, name) > 0:
                raise SettingError(name, f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not 0 <= self.port < 1 << 16:
            raise SettingError("port", f"port must be in [0, 65535], got {self.port}")
        for name in ("allowed_methods", "allowed_headers"):
            setting_list(name, getattr(self, name))
        for origin in setting_list("allowed_origins", self.allowed_origins):
            if origin != "*" and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s]+", origin):
                raise SettingError(
                    "allowed_origins",
                    f"allowed_origins: {origin!r} is not an origin: scheme://host[:port] without a path, as browsers "
                    "send it (http://localhost:3000), or *",
                )

    def served_model_names(self) -> list[str]:
        return several_values(self.served_model_name) if self.served_model_name is not None else []

    def api_keys(self) -> list[str]:
        return several_values(self.api_key) if self.api_key is not None else []

    def cors(self) -> dict[str, Any] | None:
        """Starlette's CORSMiddleware arguments (None: allowed_origins empty, no CORS layer)."""
        origins = setting_list("allowed_origins", self.allowed_origins)
        if not origins:
            return None
        return {
            "allow_origins": origins,
            "allow_methods": setting_list("allowed_methods", self.allowed_methods),
            "allow_headers": setting_list("allowed_headers", self.allowed_headers),
            "allow_credentials": self.allow_credentials,
        }


def several_values(value: str) -> list[str]:
    """The values of a setting that takes several (`several`): a JSON list of strings (as the flag's words are kept),
    else the text itself, whole: an API key or a name with a comma in it is one value, as in vLLM."""
    items = _json_strings(value)
    return [item for item in ([value] if items is None else items) if item.strip()]


def setting_list(name: str, value: str) -> list[str]:
    """A list-valued string setting: JSON (vLLM's form, `["http://a.example"]`) or comma-separated; blanks dropped."""
    items = _json_strings(value)
    if items is None and value.lstrip().startswith("["):
        raise SettingError(name, f"{name} must be a JSON list of strings or a comma-separated list, got {value!r}")
    return [item.strip() for item in (value.split(",") if items is None else items) if item.strip()]


def _json_strings(value: str) -> list[str] | None:
    """`value` as a JSON list of strings, or None where it is not one."""
    if not value.lstrip().startswith("["):
        return None
    try:
        items = json.loads(value)
    except ValueError:
        return None
    return items if isinstance(items, list) and all(isinstance(item, str) for item in items) else None


# vLLM's speculative_config keys this engine honours, as EngineConfig fields; "method" may only name a draft model
SPECULATIVE_CONFIG_FIELDS = {"model": "speculative_model", "num_speculative_tokens": "num_speculative_tokens"}
DRAFT_METHODS = (None, "draft_model")


def speculative_settings(spec: dict | None) -> dict:
    """vLLM's speculative_config as EngineConfig fields (a draft model is the one method offered)."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ValueError(f"speculative_config must be a dict, got {type(spec).__name__}")
    if spec.get("method") not in DRAFT_METHODS:
        raise ValueError(f"speculative_config: method {spec['method']!r} is not supported (only a draft model)")
    if spec.get("draft_tensor_parallel_size") not in (None, 1):
        raise ValueError("speculative_config: the draft runs on one GPU (draft_tensor_parallel_size=1)")
    unknown = [k for k in spec if k not in (*SPECULATIVE_CONFIG_FIELDS, "method", "draft_tensor_parallel_size")]
    if unknown:
        raise ValueError(
            f"speculative_config: {unknown[0]!r} is not supported (it takes {', '.join(SPECULATIVE_CONFIG_FIELDS)})"
        )
    if spec.get("model") is None or spec.get("model") == "":
        raise ValueError("speculative_config needs the draft's 'model'")
    tokens = spec.get("num_speculative_tokens")
    if not isinstance(spec["model"], str) or not (tokens is None or type(tokens) is int):
        raise ValueError(
            "speculative_config: 'model' is a directory (a string), 'num_speculative_tokens' an integer, got "
            f"{spec['model']!r}, {tokens!r}"
        )
    return {SPECULATIVE_CONFIG_FIELDS[k]: v for k, v in spec.items() if k in SPECULATIVE_CONFIG_FIELDS}


def json_object(name: str, value: Any) -> dict:
    """A setting that holds a JSON object (vLLM's JSON-valued flags) as a dict; else a SettingError naming it."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise SettingError(name, f"{name} must be a JSON object, got {value!r}")
    return parsed


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def field_type(cls: type, f) -> tuple[type, bool]:
    """(str, int, float or bool; whether None is allowed): a field's annotation."""
    hint = _type_hints(cls)[f.name]
    args = typing.get_args(hint)
    kinds = [a for a in args if a is not type(None)] if args else [hint]
    if len(kinds) != 1 or kinds[0] not in _TYPE_NAMES:
        raise TypeError(f"{cls.__name__}.{f.name}: a setting is one of str, int, float, bool, or that | None")
    return kinds[0], type(None) in args


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # (resolved once a class: every config checks every field's)


def check_types(config) -> None:
    """Each field's value of its annotated type, stored as it (settings that come from flags and variables are parsed
    to it; a Python caller's are checked here): a SettingError naming the field, not a TypeError deep in the engine.
    Numbers of another class that are the kind asked for (numpy's) become Python's, a path (os.PathLike) a string,
    a torch dtype its name (`dtype=torch.bfloat16`, as vLLM takes it). An optional string (a path, a name, JSON)
    given empty is an error, not the default: `--speculative-model ''` would run without a draft unseen."""
    for f in fields(config):
        kind, optional = field_type(type(config), f)
        value = getattr(config, f.name)
        if value is None and optional:
            continue
        taken = _as_type(value, kind)
        if taken is None:
            wanted = _TYPE_NAMES[kind] + (" or None" if optional else "")
            raise SettingError(f.name, f"{f.name} must be {wanted}, got {value!r}")
        if kind is str and optional and not taken.strip():
            raise SettingError(f.name, f"{f.name} must not be empty: leave it unset for its default")
        setattr(config, f.name, taken)


def _as_type(value: Any, kind: type) -> Any:
    """`value` as a `kind`, or None where it is not one (a bool is no number, a number no bool)."""
    if kind is bool or isinstance(value, bool):
        return value if kind is bool and isinstance(value, bool) else None
    if kind is int:
        return int(value) if isinstance(value, numbers.Integral) else None
    if kind is float:
        return float(value) if isinstance(value, numbers.Real) else None
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else None


def check_choices(config) -> None:
    for f in fields(config):
        value, choices = getattr(config, f.name), f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise SettingError(f.name, f"{f.name} must be one of {', '.join(choices)}; got {value!r}")


def _check_dir(name: str, path: str, what: str, required_file: str | None) -> None:
    where = f"(--{name.replace('_', '-')} / MINISERVE_{name.upper()})"
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {path!r} does not exist {where}")
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {path!r} is not a directory {where}")
    if required_file and not (p / required_file).is_file():
        meaning = ": it is not a Hugging Face model" if required_file == "config.json" else ""
        raise FileNotFoundError(f"{what} {path!r} has no {required_file}{meaning} {where}")


def _checked_override(value: str | dict | None) -> dict[str, Any]:
    """override_generation_config as a dict of GENERATION_KEYS, each value one a request may have: a SettingError
    naming the setting otherwise, before any model loads."""
    if value is None:
        return {}
    override = json_object("override_generation_config", value)
    unknown = sorted(set(override) - set(GENERATION_KEYS))
    try:
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (the keys are {', '.join(GENERATION_KEYS)})")
        SamplingParams(**{GENERATION_KEYS[k]: v for k, v in override.items() if v is not None})
    except ValueError as exc:
        raise SettingError("override_generation_config", f"override_generation_config: {exc}") from None
    return override


def _speculative_tokens(values: dict, setting: int | None) -> int | None:
    """speculative_config's num_speculative_tokens, else the setting's (None: neither, the default); a SettingError
    when the setting, given, says another."""
    given = values.get("num_speculative_tokens")
    if given is not None and setting is not None and setting != given:
        raise SettingError(
            "speculative_config",
            f"speculative_config says num_speculative_tokens {given} and num_speculative_tokens says {setting}: "
            "give one",
        )
    return setting if given is None else given


def _check_engine_values(c: EngineConfig) -> None:
    """EngineConfig's ranges and the settings that must agree, each a SettingError naming the setting."""
    if c.block_size < 1 or c.block_size & (c.block_size - 1):
        raise SettingError("block_size", f"block_size must be a positive power of two, got {c.block_size}")
    for name in (
        "max_num_seqs",
        "max_num_batched_tokens",
        "num_speculative_tokens",
        "max_stop_strings",
        "max_stop_string_length",
        "max_bad_words",
        "tensor_parallel_size",
    ):
        _check_min(name, getattr(c, name), 1)
    _check_min("grammar_threads", c.grammar_threads, 0)
    _check_min("max_logprobs", c.max_logprobs, -1)
    if c.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
        raise SettingError(
            "num_speculative_tokens",
            f"num_speculative_tokens must be <= {MAX_SPECULATIVE_TOKENS}, got {c.num_speculative_tokens} "
            "(a round verifies k+1 tokens a sequence as decode queries, so that greedy speculation reproduces "
            "plain decoding bit for bit)",
        )
    if c.seed is not None and not -(1 << 63) <= c.seed < 1 << 64:  # torch.manual_seed's range
        raise SettingError("seed", f"seed must be in [-2**63, 2**64-1], got {c.seed}")
    for name in ("max_model_len", "num_kv_blocks"):
        if getattr(c, name) is not None:
            _check_min(name, getattr(c, name), 1)
    if c.num_kv_blocks is not None and c.kv_cache_memory_gb is not None:
        raise SettingError("num_kv_blocks", "num_kv_blocks and kv_cache_memory_gb both size the KV pool: give one")
    if c.kv_cache_memory_gb is not None and not 0 < c.kv_cache_memory_gb < float("inf"):
        raise SettingError(
            "kv_cache_memory_gb", f"kv_cache_memory_gb must be a finite number > 0, got {c.kv_cache_memory_gb}"
        )
    c.generation_override()  # its keys and values, or a one-line error naming the setting
    if not 0.0 < c.gpu_memory_utilization <= 1.0:
        raise SettingError(
            "gpu_memory_utilization", f"gpu_memory_utilization must be in (0, 1], got {c.gpu_memory_utilization}"
        )


def _check_min(name: str, value: int, low: int) -> None:
    if value < low:
        raise SettingError(name, f"{name} must be >= {low}, got {value}")


# ---------------------------------------------------------------------------------------------- resolution


JINJA_MARKS = "{}\n"  # a chat_template value with one of these is the template itself, not a file's path


def resolve_chat_template(value: str | None) -> str | None:
    """EngineConfig.chat_template as a template's text: a file's contents, or the value itself where it holds Jinja
    marks (a path that does not exist is named, not rendered as a template that prints the path)."""
    if value is None or any(c in value for c in JINJA_MARKS):
        return value
    if not Path(value).is_file():
        raise FileNotFoundError(
            f"chat template file {value!r} does not exist (--chat-template / MINISERVE_CHAT_TEMPLATE: a file's "
            "path, or the Jinja template itself)"
        )
    try:
        return Path(value).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"chat template file {value!r} is not UTF-8 text ({e.reason} at byte {e.start}; --chat-template / "
            "MINISERVE_CHAT_TEMPLATE)"
        ) from None


def resolve_device(name: str) -> torch.device:
    """ "auto" is the GPU (CUDA or ROCm) when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:  # torch's own message lists the device types it knows
        raise SettingError("device", f"device={name!r} is not a device: {exc}") from None
    if device.type not in ("cuda", "cpu"):
        raise SettingError("device", f"device={name!r}: miniserve runs on cuda (CUDA or ROCm) or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was requested but no CUDA/ROCm GPU is available")
    return device


def resolve_dtype(name: str, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """ "auto" takes the checkpoint's dtype on a GPU and float32 on the CPU (where half precision is slow)."""
    if name != "auto":
        return TORCH_DTYPES.get(name) or DTYPE_ALIASES[name]
    return checkpoint_dtype if device.type != "cpu" else torch.float32


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """ "auto" is the model's dtype; "fp8"/"fp8_e4m3" mean the device's native e4m3 flavour: float8_e4m3fn
    everywhere except MI300-class ROCm GPUs (gfx94x), whose hardware FP8 is float8_e4m3fnuz."""
    if name not in KV_CACHE_DTYPES:
        raise SettingError(
            "kv_cache_dtype", f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {name!r}"
        )
    if name == "auto":
        return model_dtype
    if name in TORCH_DTYPES:
        return TORCH_DTYPES[name]
    if name == "fp8_e4m3fnuz":
        return torch.float8_e4m3fnuz
    return torch.float8_e4m3fnuz if _is_gfx94x(torch.device(device)) else torch.float8_e4m3fn


def _is_gfx94x(device: torch.device) -> bool:
    if device.type != "cuda" or torch.version.hip is None:
        return False
    return torch.cuda.get_device_properties(device).gcnArchName.startswith("gfx94")
