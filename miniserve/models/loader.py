"""Load a Hugging Face checkpoint directory (config.json + safetensors, single file or sharded) into LlamaModel.

Every tensor of the checkpoint must land somewhere and every parameter must be filled: a missing, unexpected or
mis-shaped tensor is an error that names the file and the tensor, because silently ignoring one gives a model
that runs and writes garbage.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from miniserve.json_file import read_json_object
from miniserve.models.config import ModelConfig
from miniserve.models.llama import LlamaModel
from miniserve.models.parallel import TensorParallel

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = ("rotary_emb.inv_freq",)  # recomputed, present in some old checkpoints
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' names of the dtypes a weight may be stored in
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
        weight_map = read_json_object(index).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in model_dir.glob("pytorch_model*.bin"))
    hint = f" (it has {pickled[0]}: PyTorch pickles are not loaded; save the model with safetensors)" if pickled else ""
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}{hint}")


class _Target(NamedTuple):
    """Where a checkpoint tensor goes: rows `rows` of `param` (None = all of it) receive
    `tensor[src_rows, src_cols]`, this rank's slice of a tensor whose full shape must be `shape`."""

    param: torch.Tensor
    rows: slice | None
    shape: tuple[int, ...]
    src_rows: slice = slice(None)
    src_cols: slice = slice(None)


def _span(start: int, count: int, unit: int = 1) -> slice:
    return slice(start * unit, (start + count) * unit)


def _targets(model: LlamaModel, name: str) -> _Target | tuple[None, None] | None:
    """Map a checkpoint tensor name to its target; with tensor parallelism, this rank's rows (column-parallel
    and vocab-parallel weights) or columns (row-parallel weights) of it (models/parallel.py)."""
    cfg, sh = model.cfg, model.shard
    hidden, hd = cfg.hidden_size, cfg.head_dim
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            return _SKIP
        param = model.embed_tokens if name == "model.embed_tokens.weight" else model.lm_head
        return _Target(param, slice(0, sh.vocab_real), (cfg.vocab_size, hidden), _span(sh.vocab_start, sh.vocab_real))
    if name == "model.norm.weight":
        return _Target(model.norm.weight, None, (hidden,))
    m = _LAYER.match(name)
    if m is None or int(m.group(1)) >= cfg.num_layers:
        return None
    layer, rest = model.layers[int(m.group(1))], m.group(2)
    attn, mlp = layer.self_attn, layer.mlp
    q, kv = attn.q_size, attn.kv_size
    qkv = {  # (rows in the fused parameter, full rows in the checkpoint, this rank's rows of those)
        "q_proj": (slice(0, q), cfg.num_heads * hd, _span(sh.q_head_start, sh.num_heads, hd)),
        "k_proj": (slice(q, q + kv), cfg.num_kv_heads * hd, _span(sh.kv_head_start, sh.num_kv_heads, hd)),
        "v_proj": (slice(q + kv, q + 2 * kv), cfg.num_kv_heads * hd, _span(sh.kv_head_start, sh.num_kv_heads, hd)),
    }
    proj, _, kind = rest.removeprefix("self_attn.").partition(".")
    if rest.startswith("self_attn.") and proj in qkv:
        rows, full, src = qkv[proj]
        if kind == "weight":
            return _Target(attn.qkv_weight, rows, (full, hidden), src)
        if kind == "bias" and attn.qkv_bias is not None:
            return _Target(attn.qkv_bias, rows, (full,), src)
        return None
    inter, inter_src = mlp.inter, _span(sh.intermediate_start, sh.intermediate_size)
    gate_up_shape, all_rows = (cfg.intermediate_size, hidden), slice(None)
    simple = {
        "self_attn.o_proj.weight": _Target(
            attn.o_weight, None, (hidden, cfg.num_heads * hd), all_rows, _span(sh.q_head_start, sh.num_heads, hd)
        ),
        "mlp.gate_proj.weight": _Target(mlp.gate_up_weight, slice(0, inter), gate_up_shape, inter_src),
        "mlp.up_proj.weight": _Target(mlp.gate_up_weight, slice(inter, 2 * inter), gate_up_shape, inter_src),
        "mlp.down_proj.weight": _Target(mlp.down_weight, None, (hidden, cfg.intermediate_size), all_rows, inter_src),
        "input_layernorm.weight": _Target(layer.input_layernorm.weight, None, (hidden,)),
        "post_attention_layernorm.weight": _Target(layer.post_attention_layernorm.weight, None, (hidden,)),
    }
    if attn.qk_norm is not None:  # one [2, head_dim] weight: q's row, then k's
        simple["self_attn.q_norm.weight"] = _Target(attn.qk_norm.weight, slice(0, 1), (hd,))
        simple["self_attn.k_norm.weight"] = _Target(attn.qk_norm.weight, slice(1, 2), (hd,))
    return simple.get(rest)


def load_weights(model: LlamaModel, model_dir: str | Path) -> dict[int, dict[str, float]]:
    """Fill every parameter of `model` from the directory; return per-layer FP8 KV scales found, if any.

    Only this rank's slice of each tensor is read from the file (safetensors slices are lazy), so with tensor
    parallelism no process ever holds the whole model."""
    filled: dict[int, int] = {}  # id(param) -> rows filled
    for param in {id(p): p for p in (model.embed_tokens, model.lm_head)}.values():  # vocab padding: zero rows
        pad = param.shape[0] - model.shard.vocab_real
        if pad:
            param.data[-pad:].zero_()
            filled[id(param)] = pad
    kv_scales: dict[int, dict[str, float]] = {}
    placed: dict[tuple, str] = {}  # (parameter, rows) -> the checkpoint tensor that filled them
    for file in checkpoint_files(model_dir):
        with _open_checkpoint(file) as f:
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
                stored = f.get_slice(name)
                if stored.get_dtype() not in _FLOAT_DTYPES:  # (copied as they are, quantized codes are garbage)
                    raise ValueError(
                        f"{file.name}: tensor {name!r} is {stored.get_dtype()}; miniserve loads unquantized "
                        "weights (F32, F16, BF16)"
                    )
                if tuple(stored.get_shape()) != target.shape:
                    raise ValueError(
                        f"{file.name}: tensor {name!r} has shape {tuple(stored.get_shape())}, expected {target.shape}"
                    )
                param = target.param
                where = (id(param), None if target.rows is None else (target.rows.start, target.rows.stop))
                if where in placed:  # (else a repeated tensor would count for another's rows, e.g. k_norm's)
                    raise ValueError(f"{file.name}: tensor {name!r} fills rows that {placed[where]!r} filled")
                placed[where] = name
                dest = param.data if target.rows is None else param.data[target.rows]
                index = (target.src_rows, target.src_cols)[: len(target.shape)]
                dest.copy_(stored[index])
                filled[id(param)] = filled.get(id(param), 0) + dest.shape[0]
    for pname, param in model.named_parameters():
        if filled.get(id(param), 0) != param.shape[0]:
            raise ValueError(f"{model_dir}: checkpoint is missing tensor(s) for parameter {pname!r}")
    return kv_scales


@contextmanager
def _open_checkpoint(file: Path) -> Iterator[Any]:
    """safe_open, with a damaged file (a cut download, a header that is no JSON) named in a one-line error."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{file}: cannot be read as a safetensors checkpoint ({e})") from None


def load_model(
    model_dir: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    backend: str,
    max_positions: int,
    tp: TensorParallel | None = None,
) -> tuple[LlamaModel, dict[int, dict[str, float]]]:
    """Build the model (this rank's shard of it, with `tp`) directly on `device` in `dtype` and load its weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaModel(cfg, backend, max_positions, tp)
    finally:
        torch.set_default_dtype(previous)
    scales = load_weights(model, model_dir)
    return model.eval(), scales
