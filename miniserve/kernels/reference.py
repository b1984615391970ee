"""Pure-torch reference of the two KV-cache operations: the Triton kernels' oracle and the CPU engine path.

Both functions follow the paged layout used everywhere in miniserve: caches are
`[num_blocks, block_size, num_kv_heads, head_dim]` and a token's slot is `block_id * block_size + offset`.
"""

from __future__ import annotations

import torch

from miniserve.kernels.fp8 import dequantize_fp8_reference, is_fp8, quantize_fp8_reference
from miniserve.kernels.metadata import AttentionMetadata

_QUERY_CHUNK = 512  # bounds the [heads, chunk, kv_len] score matrix of long prefills


def reshape_and_cache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> None:
    """Store key/value `[num_tokens, num_kv_heads, head_dim]` into their slots; negative slots are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    for src, cache, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        src = src[keep]
        if is_fp8(cache.dtype):
            cache.view(torch.uint8)[blocks, offsets] = quantize_fp8_reference(src, scale, cache.dtype).view(torch.uint8)
        else:
            cache[blocks, offsets] = src.to(cache.dtype)


def dequantize_cache(cache: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Cache values as fp32: FP8 caches are multiplied by their scale, plain caches ignore it."""
    return dequantize_fp8_reference(cache, scale) if is_fp8(cache.dtype) else cache.to(torch.float32)


def paged_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Causal attention of the packed new tokens `q` over each sequence's paged K/V, computed in fp32."""
    if meta.is_decode:
        return _decode_reference(q, key_cache, value_cache, meta, k_scale, v_scale, sm_scale)
    out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    for i, seq_len in enumerate(seq_lens):
        q_start, q_end = starts[i], starts[i + 1]
        if q_end == q_start:
            continue
        k = _gather_sequence(key_cache, meta.block_tables[i], seq_len, k_scale)  # [S, Hkv, D]
        v = _gather_sequence(value_cache, meta.block_tables[i], seq_len, v_scale)
        prefix = seq_len - (q_end - q_start)
        for c in range(q_start, q_end, _QUERY_CHUNK):
            rows = slice(c, min(c + _QUERY_CHUNK, q_end))
            qpos = prefix + torch.arange(rows.start - q_start, rows.stop - q_start, device=q.device)
            allowed = torch.arange(seq_len, device=q.device)[None, :] <= qpos[:, None]  # [L, S]
            out[rows] = _attend(q[rows], k, v, allowed, sm_scale).to(q.dtype)
    return out


def _decode_reference(q, key_cache, value_cache, meta, k_scale, v_scale, sm_scale) -> torch.Tensor:
    """One token per sequence: all sequences at once, padded to the longest context."""
    block_size = key_cache.shape[1]
    num_blocks = min(-(-meta.max_seq_len // block_size), meta.block_tables.shape[1])
    blocks = meta.block_tables[:, :num_blocks].long()
    num_seqs, num_kv_heads, head_dim = q.shape[0], key_cache.shape[2], key_cache.shape[3]
    k = dequantize_cache(key_cache[blocks], k_scale).reshape(num_seqs, -1, num_kv_heads, head_dim)
    v = dequantize_cache(value_cache[blocks], v_scale).reshape(num_seqs, -1, num_kv_heads, head_dim)
    positions = torch.arange(k.shape[1], device=q.device)
    allowed = positions[None, :] < meta.seq_lens.to(q.device).long()[:, None]  # [B, S]
    # past a sequence's end lie other requests' pages (the table's padding) and stale slots: a NaN there would
    # poison the P.V sum (0 x NaN), so their values are zeroed, as the Triton kernel never loads them
    v = v.masked_fill(~allowed[:, :, None, None], 0.0)
    group = q.shape[1] // num_kv_heads
    qg = q.float().reshape(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bshd->bhgs", qg, k) * sm_scale
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgs,bshd->bhgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(q.shape).to(q.dtype)


def _gather_sequence(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, scale) -> torch.Tensor:
    """The first `seq_len` tokens of one sequence's pages, dequantized: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-seq_len // block_size)].long()
    return dequantize_cache(cache[blocks], scale).flatten(0, 1)[:seq_len]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, sm_scale: float):
    """q [L, Hq, D] over k/v [S, Hkv, D] (fp32) with a boolean [L, S] mask; GQA groups share a KV head."""
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    qg = q.float().reshape(q.shape[0], num_kv_heads, num_q_heads // num_kv_heads, q.shape[2])
    scores = torch.einsum("lhgd,shd->hgls", qg, k) * sm_scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("hgls,shd->lhgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(q.shape)
