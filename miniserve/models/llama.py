"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) as one packed-token forward pass over a paged KV cache.

Tokens of all sequences in a step are packed into one [num_tokens] batch (no padding); `AttentionMetadata` says
which tokens belong to which sequence. Each layer writes its new K/V through `reshape_and_cache` (the single KV
write path, which rotates q and k on the way) and then attends over the paged cache. The differences between the
four architectures are two switches: qkv bias (Qwen2) and per-head q/k RMSNorm (Qwen3).

With tensor parallelism (`tp`, see models/parallel.py) every layer holds only this rank's heads and intermediate
slice; the o and down projections end with one all-reduce each, the embedding and the LM head are vocab-parallel.
Without it (`tp=None`) none of those ops exist: the single-GPU pass is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from miniserve.kernels.layer_ops import Rope, qk_rms_norm, rms_norm
from miniserve.kernels.linear import linear, linear_silu_and_mul
from miniserve.kernels.metadata import AttentionMetadata
from miniserve.kernels.ops import paged_attention, reshape_and_cache
from miniserve.models.config import ModelConfig
from miniserve.models.parallel import ShardLayout, TensorParallel


@dataclass
class LayerKV:
    """One layer's slice of a worker's KV pool plus its per-layer FP8 scales (fp32 tensors of shape [1])."""

    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor


def _empty(*shape: int) -> nn.Parameter:
    """Parameters are filled by the loader, so skip the random init that nn.Linear would waste time on."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: str):
        super().__init__()
        self.weight = _empty(dim)
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, pdl: bool = False):
        """RMSNorm(x), or with `residual`: (RMSNorm(x + residual), x + residual), one fused launch on GPUs.
        Same op order as transformers: normalise in fp32, cast back, then scale. pdl: see LlamaModel.forward."""
        return rms_norm(x, self.weight, self.eps, residual, self.backend, pdl)


class QKNorm(nn.Module):
    """Qwen3's q_norm and k_norm (one weight each over head_dim), applied to every q and k head in one launch."""

    def __init__(self, head_dim: int, eps: float, backend: str):
        super().__init__()
        self.weight = _empty(2, head_dim)  # row 0: q_norm.weight, row 1: k_norm.weight (models/loader.py)
        self.eps = eps
        self.backend = backend

    def forward(self, qk: torch.Tensor, num_q_heads: int, pdl: bool = False) -> torch.Tensor:
        """qk: [T, Hq + Hkv, D], q's heads then k's (a view of the packed qkv); returns them normalised, new."""
        return qk_rms_norm(qk, self.weight, num_q_heads, self.eps, self.backend, pdl)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with the `llama3`, `linear` or `yarn` scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    if scaling["rope_type"] == "yarn":
        return _yarn_inv_freq(cfg, scaling)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(cfg: ModelConfig, scaling: dict) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): dimensions that turn more than beta_fast times over the trained length keep
    their frequency, those that turn fewer than beta_slow times are interpolated by the factor, with a linear ramp
    between; as transformers computes it (the float32 frequencies of `base ** (2i / dim)`)."""
    dim, base, factor = cfg.head_dim, cfg.rope_theta, scaling["factor"]
    trained = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)

    def turns_to_dim(turns: float) -> float:  # the dimension whose wave turns `turns` times over the trained length
        return dim * math.log(trained / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = turns_to_dim(scaling.get("beta_fast") or 32), turns_to_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high += 0.001 if high == low else 0  # (transformers' guard against an empty ramp)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the dimension keeps its frequency (extrapolates)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor YaRN scales cos and sin by (so q.k by its square): `attention_factor` as given, else the
    paper's 0.1 ln(factor) + 1 (with DeepSeek's mscale and mscale_all_dim, their ratio); 1 for other RoPE."""
    scaling = cfg.rope_scaling
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(m: float) -> float:
        return 1.0 if scaling["factor"] <= 1 else 0.1 * m * math.log(scaling["factor"]) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"])
    return mscale(1.0)


class Rotary(nn.Module):
    """fp32 cos/sin tables for every position, computed once like transformers does per call (YaRN's attention
    factor applied, as there); each layer's rotation reads the rows of its tokens' positions (inside the fused
    kernel on GPUs)."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * rope_inv_freq(cfg)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        factor = rope_attention_factor(cfg)
        self.register_buffer("cos", emb.cos() * factor, persistent=False)
        self.register_buffer("sin", emb.sin() * factor, persistent=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str, shard: ShardLayout, tp: TensorParallel | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = shard.num_heads, shard.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.qkv_weight = _empty(self.q_size + 2 * self.kv_size, cfg.hidden_size)  # q, k, v stacked
        self.qkv_bias = _empty(self.q_size + 2 * self.kv_size) if cfg.qkv_bias else None
        self.o_weight = _empty(cfg.hidden_size, self.q_size)
        self.qk_norm = QKNorm(cfg.head_dim, cfg.rms_norm_eps, backend) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        self.backend = backend
        self.fp8_decode = "auto"  # EngineConfig.fp8_decode, set by the runner whose pool is FP8
        self.decode_splits = "by-length"  # EngineConfig.decode_splits, set by the runner
        self.tp = tp

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary,
        meta: AttentionMetadata,
        kv: LayerKV,
        pdl: bool = False,
    ) -> torch.Tensor:
        qkv = linear(x, self.qkv_weight, self.qkv_bias, pdl)
        heads = qkv.view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk, v = heads.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.qk_norm is not None:
            qk = self.qk_norm(qk, self.num_heads, pdl)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        rope = Rope(q, positions, rotary.cos, rotary.sin)  # q and k rotate in place (views of qkv are fine)
        reshape_and_cache(
            k, v, kv.key_cache, kv.value_cache, meta.slot_mapping, kv.k_scale, kv.v_scale, self.backend, rope, pdl
        )
        out = paged_attention(
            q, kv.key_cache, kv.value_cache, meta, kv.k_scale, kv.v_scale, self.scale, self.backend,
            self.fp8_decode, self.decode_splits, pdl,
        )  # fmt: skip
        out = linear(out.reshape(-1, self.q_size), self.o_weight, pdl=pdl)
        return out if self.tp is None else self.tp.all_reduce(out)  # row-parallel: sum the ranks' partials


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str, shard: ShardLayout, tp: TensorParallel | None):
        super().__init__()
        self.backend = backend
        self.inter = shard.intermediate_size
        self.gate_up_weight = _empty(2 * self.inter, cfg.hidden_size)  # gate, up stacked
        self.down_weight = _empty(cfg.hidden_size, self.inter)
        self.tp = tp

    def forward(self, x: torch.Tensor, pdl: bool = False) -> torch.Tensor:
        h = linear_silu_and_mul(x, self.gate_up_weight, self.backend, pdl)
        out = linear(h, self.down_weight, pdl=pdl)
        return out if self.tp is None else self.tp.all_reduce(out)  # row-parallel: sum the ranks' partials


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str, shard: ShardLayout, tp: TensorParallel | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.self_attn = Attention(cfg, backend, shard, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.mlp = MLP(cfg, backend, shard, tp)

    def forward(self, x, residual, positions, rotary, meta, kv, pdl=False):
        """x + attn(norm(x)), then + mlp(norm(.)), with each residual add fused into the norm that follows it:
        takes and returns (branch output, residual stream) -- residual None on the first layer."""
        if residual is None:
            h, residual = self.input_layernorm(x, pdl=pdl), x
        else:
            h, residual = self.input_layernorm(x, residual, pdl)
        h = self.self_attn(h, positions, rotary, meta, kv, pdl)
        h, residual = self.post_attention_layernorm(h, residual, pdl)
        return self.mlp(h, pdl), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head; `forward` returns hidden states, `logits` projects.
    With `tp`, this rank's shard of each (see models/parallel.py)."""

    def __init__(self, cfg: ModelConfig, backend: str, max_positions: int, tp: TensorParallel | None = None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.shard = ShardLayout.of(cfg) if tp is None else ShardLayout.of(cfg, tp.rank, tp.size)
        vocab_rows = self.shard.vocab_rows
        self.embed_tokens = _empty(vocab_rows, cfg.hidden_size)
        # the elementwise ops run as fused Triton kernels wherever attention does, else as their torch references
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend, self.shard, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else _empty(vocab_rows, cfg.hidden_size)
        self.rotary = Rotary(cfg, max_positions)
        self.dependent_tokens = 0  # passes of 1..this many tokens launch as dependents (runner: set_dependent_launch)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: list[LayerKV]
    ) -> torch.Tensor:
        if self.tp is None:
            x = F.embedding(input_ids, self.embed_tokens)
        else:
            x = self.tp.embedding(input_ids, self.embed_tokens, self.shard)
        # pdl: this pass's kernels launch as programmatic dependents (kernels/dependent_launch.py), decided once
        pdl = 0 < input_ids.shape[0] <= self.dependent_tokens
        residual = None
        for layer, layer_kv in zip(self.layers, kv, strict=True):
            x, residual = layer(x, residual, positions, self.rotary, meta, layer_kv, pdl)
        return self.norm(x, pdl=pdl) if residual is None else self.norm(x, residual, pdl)[0]

    def logits(self, hidden: torch.Tensor, as_float: bool = True) -> torch.Tensor:
        """fp32 logits, or in the model dtype when only their argmax is read (the conversion is exact)."""
        logits = F.linear(hidden, self.lm_head)
        if self.tp is not None:
            logits = self.tp.gather_vocab(logits, self.cfg.vocab_size)
        return logits.float() if as_float else logits
