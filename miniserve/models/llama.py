"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) as one packed-token forward pass over a paged KV cache.

Tokens of all sequences in a step are packed into one [num_tokens] batch (no padding); `AttentionMetadata` says
which tokens belong to which sequence. Each layer writes its new K/V through `reshape_and_cache` (the single KV
write path) and then attends over the paged cache. The differences between the four architectures are two
switches: qkv bias (Qwen2) and per-head q/k RMSNorm (Qwen3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from miniserve.kernels import paged_attention, reshape_and_cache
from miniserve.kernels.metadata import AttentionMetadata
from miniserve.models.config import ModelConfig


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
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = _empty(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as transformers: normalise in fp32, cast back, then scale.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with the `llama3` or `linear` scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """cos/sin tables for every position, computed once in fp32 like transformers does per call."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * rope_inv_freq(cfg)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D] cos and signed sin for the tokens' positions, gathered once per forward for all layers.

        transformers' rotate_half(x) * sin == x.roll(D/2) * cat(-sin1, sin2) exactly (a negation moves between
        factors), so applying RoPE costs one roll instead of two slices, a negation and a concatenation.
        """
        half = self.sin.shape[-1] // 2
        cos, sin = self.cos[positions], self.sin[positions]
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_weight = _empty(self.q_size + 2 * self.kv_size, cfg.hidden_size)  # q, k, v stacked
        self.qkv_bias = _empty(self.q_size + 2 * self.kv_size) if cfg.qkv_bias else None
        self.o_weight = _empty(cfg.hidden_size, self.q_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        self.backend = backend

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, kv: LayerKV
    ) -> torch.Tensor:
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        reshape_and_cache(k, v, kv.key_cache, kv.value_cache, meta.slot_mapping, kv.k_scale, kv.v_scale)
        out = paged_attention(q, kv.key_cache, kv.value_cache, meta, kv.k_scale, kv.v_scale, self.scale, self.backend)
        return F.linear(out.reshape(-1, self.q_size), self.o_weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_weight = _empty(2 * cfg.intermediate_size, cfg.hidden_size)  # gate, up stacked
        self.down_weight = _empty(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_weight).split(self.inter, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, meta, kv):
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head; `forward` returns hidden states, `logits` projects."""

    def __init__(self, cfg: ModelConfig, backend: str, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = _empty(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else _empty(cfg.vocab_size, cfg.hidden_size)
        self.rotary = Rotary(cfg, max_positions)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: list[LayerKV]
    ) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_tokens)
        rope = self.rotary.lookup(positions, x.dtype)
        for layer, layer_kv in zip(self.layers, kv, strict=True):
            x = layer(x, rope, meta, layer_kv)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
