"""The two-launch KV write, for the end-to-end fused-vs-unfused comparison (`throughput.py --kv-write`).

Launch 1 quantizes K and V into contiguous staging buffers (rotating q and k first, as the fused write does);
launch 2 scatters those bytes into their pages.
Both launches are the fused kernel itself (a cast with identity slots, then a same-dtype copy), so the bytes are
identical and the difference measured is exactly the fusion. Both are capturable in CUDA graphs.
"""

from __future__ import annotations

import torch


def reshape_and_cache_two_launch(
    key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, backend="auto", rope=None, pdl=False
) -> None:
    """`reshape_and_cache`'s signature (the model calls it so); always the Triton kernels."""
    from miniserve.kernels.cache_write import reshape_and_cache_triton

    t, heads, dim = key.shape
    if key_cache.dtype == key.dtype:  # nothing to cast: the fused kernel is already a plain scatter
        reshape_and_cache_triton(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, rope=rope, pdl=pdl)
        return
    stage_k = torch.empty(t, 1, heads, dim, dtype=key_cache.dtype, device=key.device)
    stage_v = torch.empty_like(stage_k)
    ident = torch.arange(t, device=key.device)
    reshape_and_cache_triton(key, value, stage_k, stage_v, ident, k_scale, v_scale, rope=rope, pdl=pdl)  # rotate, cast
    reshape_and_cache_triton(
        stage_k[:, 0], stage_v[:, 0], key_cache, value_cache, slot_mapping, k_scale, v_scale, pdl=pdl
    )
