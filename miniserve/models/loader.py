"""Load a Hugging Face checkpoint directory (config.json + safetensors, single file or sharded) into LlamaModel.

Every tensor of the checkpoint must land somewhere and every parameter must be filled: a missing, unexpected or
mis-shaped tensor is an error that names the file and the tensor, because silently ignoring one gives a model
that runs and writes garbage.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from miniserve.models.config import ModelConfig
from miniserve.models.llama import LlamaModel

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = ("rotary_emb.inv_freq",)  # recomputed, present in some old checkpoints
_SKIP = (None, None)  # a tensor we know and deliberately do not load (lm_head of a tied model)
_KV_SCALE_NAMES = {  # FP8 KV scales as vLLM/llm-compressor checkpoints spell them
    "self_attn.k_scale": "k",
    "self_attn.v_scale": "v",
    "self_attn.k_proj.k_scale": "k",
    "self_attn.v_proj.v_scale": "v",
    "self_attn.kv_scale": "kv",
}


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a directory: the index's shards if an index exists, else model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def _targets(model: LlamaModel, name: str) -> tuple[torch.Tensor | None, slice | None] | None:
    """Map a checkpoint tensor name to (parameter, row slice within a fused parameter)."""
    cfg = model.cfg
    if name == "model.embed_tokens.weight":
        return model.embed_tokens, None
    if name == "model.norm.weight":
        return model.norm.weight, None
    if name == "lm_head.weight":
        return (model.lm_head, None) if not cfg.tie_word_embeddings else _SKIP
    m = _LAYER.match(name)
    if m is None or int(m.group(1)) >= cfg.num_layers:
        return None
    layer, rest = model.layers[int(m.group(1))], m.group(2)
    attn, mlp = layer.self_attn, layer.mlp
    q, kv = attn.q_size, attn.kv_size
    qkv_rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    proj, _, kind = rest.removeprefix("self_attn.").partition(".")
    if rest.startswith("self_attn.") and proj in qkv_rows:
        if kind == "weight":
            return attn.qkv_weight, qkv_rows[proj]
        if kind == "bias" and attn.qkv_bias is not None:
            return attn.qkv_bias, qkv_rows[proj]
        return None
    inter = mlp.inter
    simple = {
        "self_attn.o_proj.weight": (attn.o_weight, None),
        "mlp.gate_proj.weight": (mlp.gate_up_weight, slice(0, inter)),
        "mlp.up_proj.weight": (mlp.gate_up_weight, slice(inter, 2 * inter)),
        "mlp.down_proj.weight": (mlp.down_weight, None),
        "input_layernorm.weight": (layer.input_layernorm.weight, None),
        "post_attention_layernorm.weight": (layer.post_attention_layernorm.weight, None),
    }
    if attn.q_norm is not None:
        simple["self_attn.q_norm.weight"] = (attn.q_norm.weight, None)
        simple["self_attn.k_norm.weight"] = (attn.k_norm.weight, None)
    return simple.get(rest)


def load_weights(model: LlamaModel, model_dir: str | Path) -> dict[int, dict[str, float]]:
    """Fill every parameter of `model` from the directory; return per-layer FP8 KV scales found, if any."""
    filled: dict[int, int] = {}  # id(param) -> rows filled
    kv_scales: dict[int, dict[str, float]] = {}
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED):
                    continue
                m = _LAYER.match(name)
                scale_kind = _KV_SCALE_NAMES.get(m.group(2)) if m else None
                if scale_kind is not None:
                    value = float(f.get_tensor(name).float().reshape(-1)[0])
                    for k in ("k", "v") if scale_kind == "kv" else (scale_kind,):
                        kv_scales.setdefault(int(m.group(1)), {})[k] = value
                    continue
                target = _targets(model, name)
                if target is _SKIP:
                    continue
                if target is None:
                    raise ValueError(f"{file.name}: unexpected tensor {name!r} for {model.cfg.architecture}")
                param, rows = target
                dest = param.data if rows is None else param.data[rows]
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise ValueError(
                        f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                    )
                dest.copy_(tensor)
                filled[id(param)] = filled.get(id(param), 0) + dest.shape[0]
    for pname, param in model.named_parameters():
        if filled.get(id(param), 0) != param.shape[0]:
            raise ValueError(f"{model_dir}: checkpoint is missing tensor(s) for parameter {pname!r}")
    return kv_scales


def load_model(
    model_dir: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    backend: str,
    max_positions: int,
) -> tuple[LlamaModel, dict[int, dict[str, float]]]:
    """Build the model directly on `device` in `dtype` and load its weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaModel(cfg, backend, max_positions)
    finally:
        torch.set_default_dtype(previous)
    scales = load_weights(model, model_dir)
    return model.eval(), scales
