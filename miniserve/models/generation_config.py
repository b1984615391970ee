"""The model's recommended sampling settings, from its generation_config.json, as vLLM reads them.

vLLM's default (`--generation-config auto`) takes temperature, top_p, top_k, min_p, repetition_penalty and
max_new_tokens from there: they become the defaults of `LLM.generate` without sampling params and of every server
request field left unset (max_new_tokens caps max_tokens). Qwen3's, for one, asks for temperature 0.6, top_p 0.95
and top_k 20. `generation_config="vllm"` keeps vLLM's own defaults instead, and a directory's generation_config.json
gives them in place of the model's (its eos_token_id stops beside the tokenizer's). `override_generation_config`
sets some of the same keys over any.
"""

from __future__ import annotations

from pathlib import Path

from miniserve.config import GENERATION_CONFIGS, GENERATION_KEYS
from miniserve.json_file import read_eos_token_ids, read_json_object


def generation_config_dir(model_dir: str | Path, mode: str) -> Path:
    """Where generation_config.json is read from: the model's directory (auto, vllm) or the one `mode` names, as
    vLLM's `--generation-config DIR`."""
    return Path(model_dir) if mode in GENERATION_CONFIGS else Path(mode)


def sampling_defaults(model_dir: str | Path, mode: str, override: dict) -> dict[str, float | int]:
    """SamplingParams fields generation_config.json sets (none with mode "vllm" or without one), with `override`'s
    (vLLM's override_generation_config, checked by EngineConfig: the same keys) over them."""
    path = generation_config_dir(model_dir, mode) / "generation_config.json"
    raw = read_json_object(path) if mode != "vllm" and path.is_file() else {}
    raw = {**raw, **override}
    return {ours: raw[theirs] for theirs, ours in GENERATION_KEYS.items() if raw.get(theirs) is not None}


def eos_token_ids(model_dir: str | Path, mode: str) -> set[int]:
    """generation_config.json's eos_token_id, one id or a list (Llama 3.1's <|eom_id|> and <|eot_id|>, Qwen2.5's
    <|endoftext|>): the model's own stop tokens, which vLLM stops on in every mode, whichever directory the
    tokenizer comes from (the tokenizer reads only its own directory's files)."""
    return read_eos_token_ids(generation_config_dir(model_dir, mode) / "generation_config.json")
