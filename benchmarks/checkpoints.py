"""Random-weight Hugging Face checkpoints of real model shapes, for benchmarks (no download needed).

Each shape uses the exact `config.json` values of the published model. Weights are N(0, 0.02) (norms 1), so the
model computes exactly what the real one would cost, and writes nonsense. The tokenizer is word-level over the
full vocabulary (token `i` is the word `t{i}`), so any token id detokenizes and the text path is exercised.

    from benchmarks.checkpoints import build_checkpoint
    path = build_checkpoint("llama-3.2-1b", "/tmp/ckpt")   # written once, reused afterwards
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}

SHAPES: dict[str, dict] = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192},
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 8192},
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    },
}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Hugging Face checkpoint, by name."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if cfg["model_type"] == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def num_parameters(cfg: dict) -> int:
    return sum(torch.Size(s).numel() for s in tensor_shapes(cfg).values())


def write_tokenizer(directory: Path, cfg: dict) -> None:
    """A word-level tokenizer.json covering every id of the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    eos = cfg["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": f"t{cfg['bos_token_id']}"}
    config["eos_token"] = f"t{eos}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def write_weights(directory: Path, cfg: dict, device: str, seed: int = 0, shard_bytes: int = 4 << 30) -> None:
    """N(0, 0.02) bf16 matrices and unit norms, in safetensors shards of about `shard_bytes`."""
    from safetensors.torch import save_file

    g = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in tensor_shapes(cfg).items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        if size and size + t.numel() * 2 > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 2
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, fname)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def build_checkpoint(shape: str, root: str | Path, device: str | None = None, overrides: dict | None = None) -> Path:
    """Write (once) the random-weight checkpoint of `shape` under `root`; return its directory.

    `overrides` change config values (tests shrink layers and sizes to run on a CPU)."""
    cfg = {**SHAPES[shape], **(overrides or {})}
    tag = shape if not overrides else shape + "-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    directory = Path(root) / tag
    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    write_weights(directory, cfg, device)
    write_tokenizer(directory, cfg)
    eos = cfg["eos_token_id"]
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "bos_token_id": cfg["bos_token_id"]})
    )
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))  # last: marks the checkpoint complete
    return directory
