"""The two KV-cache ops the model calls, dispatched to their Triton kernel or torch reference.

`reshape_and_cache` is the single KV write path (every layer of every model role writes through it, so the FP8
quantization is defined once; the layers have it rotate q and k on the way); `paged_attention` reads the paged
cache, with the decode kernel when every sequence brings one query token and the extend kernel otherwise. Triton
modules are imported on first use, so the CPU engine works where Triton is missing.
"""

from __future__ import annotations

import torch

from miniserve.kernels.backend import use_triton
from miniserve.kernels.layer_ops import Rope, apply_rotary_reference_, check_rotary_args
from miniserve.kernels.metadata import AttentionMetadata
from miniserve.kernels.reference import paged_attention_reference, reshape_and_cache_reference


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    backend: str = "auto",
    rope: Rope | None = None,
    pdl: bool = False,
) -> None:
    """Write K and V `[num_tokens, num_kv_heads, head_dim]` into the paged caches at `slot_mapping`.

    FP8 caches store `quantize_fp8_reference(x, scale)` bytes; plain caches store `x.to(cache.dtype)`.
    backend: "auto", "triton" or "torch" (kernels/backend.py). The scales are fp32 tensors of shape [1], read on
    the device (no host sync). rope: first rotate `rope.query` and `key` in place, exactly as
    `apply_rotary_reference_` does, in the same launch on GPUs (a rotary kernel of its own was one more launch a
    layer, mostly latency). pdl: launch the Triton kernel as a programmatic dependent (kernels/dependent_launch.py;
    only where `dependent_launch_supported`).
    """
    _check_cache_write_args(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    if rope is not None:
        check_rotary_args(rope.query, key, rope.positions, rope.cos, rope.sin)
    if use_triton(key.device, backend):
        from miniserve.kernels.cache_write import reshape_and_cache_triton

        reshape_and_cache_triton(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, rope=rope, pdl=pdl)
        return
    if rope is not None:
        apply_rotary_reference_(rope.query, key, rope.positions, rope.cos, rope.sin)
    reshape_and_cache_reference(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    sm_scale: float,
    backend: str = "auto",
    fp8_decode: str = "auto",
    decode_splits: str = "by-length",
    pdl: bool = False,
) -> torch.Tensor:
    """Causal attention of the packed new tokens `q` [num_tokens, num_q_heads, head_dim] over the paged cache.

    backend "triton": the decode kernel when every sequence brings one token (see
    `AttentionMetadata.as_decode_queries`), else the extend kernel. Returns `[num_tokens, num_q_heads, head_dim]`
    in q.dtype. fp8_decode: how the kernels convert an FP8 cache (EngineConfig.fp8_decode; the reference is exact);
    decode_splits: how the decode kernel splits contexts (EngineConfig.decode_splits; the reference has no splits);
    pdl: launch the decode kernels as programmatic dependents (as reshape_and_cache's; the extend kernel is launched
    the ordinary way).
    """
    if q.shape[1] % key_cache.shape[2]:
        raise ValueError(f"num_q_heads ({q.shape[1]}) must be a multiple of num_kv_heads ({key_cache.shape[2]})")
    if q.shape[2] != key_cache.shape[3]:
        raise ValueError(f"q head_dim ({q.shape[2]}) != cache head_dim ({key_cache.shape[3]})")
    if not use_triton(q.device, backend):
        return paged_attention_reference(q, key_cache, value_cache, meta, k_scale, v_scale, sm_scale)
    if meta.is_decode:
        from miniserve.kernels.decode_attention import decode_attention

        return decode_attention(
            q, key_cache, value_cache, meta, k_scale, v_scale, sm_scale, fp8_decode=fp8_decode,
            decode_splits=decode_splits, pdl=pdl,
        )  # fmt: skip
    from miniserve.kernels.extend_attention import extend_attention

    return extend_attention(q, key_cache, value_cache, meta, k_scale, v_scale, sm_scale, fp8_decode=fp8_decode)


def _check_cache_write_args(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale) -> None:
    """Shape/dtype checks only: nothing here reads device memory."""
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key/value must both be [num_tokens, num_kv_heads, head_dim], got {key.shape}, {value.shape}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"key_cache/value_cache must match [num_blocks, block_size, heads, dim], got {key_cache.shape}"
        )
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(f"key_cache dtype {key_cache.dtype} != value_cache dtype {value_cache.dtype}")
    if tuple(key_cache.shape[2:]) != tuple(key.shape[1:]):
        raise ValueError(f"cache heads/dim {tuple(key_cache.shape[2:])} != key heads/dim {tuple(key.shape[1:])}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != key.shape[:1]:
        raise ValueError(f"slot_mapping must be int64 [num_tokens], got {slot_mapping.dtype} {slot_mapping.shape}")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale.dtype != torch.float32 or scale.numel() != 1:
            raise ValueError(f"{name} must be an fp32 tensor of shape [1], got {scale.dtype} {tuple(scale.shape)}")
