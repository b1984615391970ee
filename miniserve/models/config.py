"""ModelConfig: the few numbers of a Hugging Face `config.json` that a Llama-family forward pass needs.

Checkpoints spell RoPE settings two ways: Hub files use `rope_theta` + `rope_scaling`, transformers >= 5 writes
`rope_parameters`. Both land in `rope_theta` and `rope_scaling` here so the model code sees one form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from miniserve.config import TORCH_DTYPES
from miniserve.json_file import read_json_object

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


# head_dim where a config.json leaves it out and transformers' config class does not derive it (Qwen3Config: 128)
DEFAULT_HEAD_DIMS = {"Qwen3ForCausalLM": 128}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    torch_dtype: torch.dtype
    sliding_window: int | None
    eos_token_ids: list[int]

    @property
    def max_context(self) -> int:
        """The longest context the checkpoint is made for: max_position_embeddings, times the factor of `linear`
        RoPE scaling, which stretches that many positions over factor times as many tokens (e.g. a 16k model
        with max_position_embeddings=4096 and factor 4; vLLM derives the same), or of `yarn` scaling times the
        length it was trained at (original_max_position_embeddings: Qwen3's 32k by 4 is 128k, as vLLM derives
        it). A `llama3` config already gives the stretched length."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type") == "linear":
            return int(self.max_position_embeddings * scaling["factor"])
        if scaling.get("rope_type") == "yarn":
            trained = scaling.get("original_max_position_embeddings", self.max_position_embeddings)
            return int(trained * scaling["factor"])
        return self.max_position_embeddings

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {model_dir} is not a Hugging Face model directory")
        return cls.from_dict(read_json_object(path), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        arch = (raw.get("architectures") or [None])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: unsupported architecture {arch!r}; miniserve supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if key not in raw:
                raise ValueError(f"{source}: missing required field {key!r}")
        num_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or DEFAULT_HEAD_DIMS.get(arch) or raw["hidden_size"] // num_heads
        _refuse_unbuilt(raw, arch, source)
        theta, scaling = _rope_settings(raw, source)
        window = _sliding_window(raw, arch)
        eos = raw.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        dtype_name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM",
            torch_dtype=TORCH_DTYPES.get(str(dtype_name).replace("torch.", ""), torch.float32),
            sliding_window=window,
            eos_token_ids=eos_ids,
        )


def _sliding_window(raw: dict, arch: str) -> int | None:
    """The window some layer's attention is limited to, read as transformers 5 reads it (None: every layer sees the
    whole context). Llama has none (a stray key is unused); Mistral's defaults to 4096 tokens when the key is
    absent; Qwen2/3 use theirs only with use_sliding_window, in the layers layer_types names (by default those from
    max_window_layers on)."""
    if arch == "MistralForCausalLM":
        return raw.get("sliding_window", 4096)
    if not arch.startswith("Qwen") or not raw.get("use_sliding_window", False):
        return None
    window = raw.get("sliding_window", 4096)
    types = raw.get("layer_types") or [
        "sliding_attention" if window is not None and i >= raw.get("max_window_layers", 28) else "full_attention"
        for i in range(raw["num_hidden_layers"])
    ]
    return window if "sliding_attention" in types else None


def _refuse_unbuilt(raw: dict, arch: str, source: str) -> None:
    """Config fields that change the model's math in transformers but that this model does not build: refused by
    name, never loaded into a model that computes something else. (Mistral's and Qwen2's transformers models
    ignore `attention_bias`; Qwen2 always has its q/k/v bias and no o_proj bias, which is what qkv_bias builds.)"""
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' "swish" is SiLU too
        raise ValueError(f"{source}: unsupported hidden_act {act!r}; miniserve's MLP is SiLU-gated (silu, swish)")
    if raw.get("mlp_bias"):
        raise ValueError(f"{source}: unsupported mlp_bias=true (biases on the MLP projections)")
    if raw.get("attention_bias") and arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        raise ValueError(f"{source}: unsupported attention_bias=true for {arch} (biases on q/k/v and o_proj)")
    quant = raw.get("quantization_config")
    if isinstance(quant, dict) and _quantizes_weights(quant):
        raise ValueError(
            f"{source}: unsupported quantization_config (quant_method {quant.get('quant_method')!r}): miniserve "
            "loads float32/float16/bfloat16 weights (a checkpoint's FP8 KV-cache scales are read)"
        )


def _quantizes_weights(quant: dict) -> bool:
    """Whether a quantization_config quantizes the weights: all do but llm-compressor's KV-cache-only scheme
    (compressed-tensors with a kv_cache_scheme and no config_groups), whose k/v scales the loader reads."""
    return quant.get("quant_method") != "compressed-tensors" or bool(quant.get("config_groups"))


def _rope_settings(raw: dict, source: str) -> tuple[float, dict | None]:
    """Return (rope_theta, rope_scaling) from either spelling; rope_scaling None means plain RoPE. A flat
    `rope_parameters` may leave rope_theta at the top level."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # per-layer-type dict (transformers 5): the full-attention layers' parameters
        params = params.get("full_attention") or next(iter(params.values()))
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = dict(raw["rope_scaling"]) if raw.get("rope_scaling") else None
    return float(theta), None if scaling is None else _checked_scaling(scaling, source)


def _checked_scaling(scaling: dict, source: str) -> dict | None:
    """A rope scaling with its type under "rope_type" (Hub files may say "type"), None for plain RoPE; a type this
    model does not build, or a factor or an optional number that is not one, refused by name."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in ROPE_SCALINGS:
        raise ValueError(
            f"{source}: unsupported rope scaling type {rope_type!r} (supported: {', '.join(ROPE_SCALINGS)})"
        )
    if not _is_number(scaling.get("factor")) or scaling["factor"] <= 0:
        raise ValueError(f"{source}: {rope_type} rope scaling needs a positive 'factor', got {scaling.get('factor')!r}")
    for key in ROPE_NUMBERS:
        if scaling.get(key) is not None and not _is_number(scaling[key]):
            raise ValueError(f"{source}: {rope_type} rope scaling's {key!r} must be a number, got {scaling[key]!r}")
    return {**scaling, "rope_type": rope_type}


ROPE_SCALINGS = ("llama3", "linear", "yarn")
# the scalings' optional numbers (models/llama.py: rope_inv_freq), checked at load rather than failing in the math
ROPE_NUMBERS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "attention_factor",
                "beta_fast", "beta_slow", "mscale", "mscale_all_dim")  # fmt: skip


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
