"""How long a context the engine serves and how many KV blocks its pool gets.

Both are decided once, at start-up, from the settings and the loaded models: the context length is the smallest
model limit (or the configured one; capped at a sliding window), and the pool fills the memory budget up to what
`max_num_seqs` sequences of that length can ever use. Target and draft share one block table per sequence, so
they get the same number of blocks, each in its own pool.
"""

from __future__ import annotations

import os
import warnings

import torch

from miniserve.config import EngineConfig, SettingError
from miniserve.engine.model_runner import ModelRunner

CPU_KV_BUDGET_BYTES = 1 << 30


def max_model_len(config: EngineConfig, runners: list[ModelRunner]) -> int:
    """The configured context length, checked against every model's position limit; capped at a sliding
    window, which miniserve does not implement."""
    cfg = runners[0].model_config
    limit = min(r.model_config.max_context for r in runners)
    wanted = config.max_model_len or limit
    if wanted > limit:
        raise ValueError(
            f"max_model_len={wanted} exceeds the model's context length {limit} ({_limit_source(runners)})"
        )
    if cfg.sliding_window is not None and wanted > cfg.sliding_window:
        # full attention equals sliding-window attention up to the window; beyond it the two differ
        warnings.warn(
            f"{config.model} uses sliding-window attention ({cfg.sliding_window} tokens), which miniserve "
            f"does not implement: max_model_len is capped at {cfg.sliding_window}",
            stacklevel=3,
        )
        wanted = cfg.sliding_window
    return wanted


def _limit_source(runners: list[ModelRunner]) -> str:
    """Where the smallest model's context length comes from, in its config.json's words."""
    cfg = min((r.model_config for r in runners), key=lambda c: c.max_context)
    if cfg.max_context == cfg.max_position_embeddings:
        return f"max_position_embeddings={cfg.max_position_embeddings}"
    factor, rope_type = cfg.rope_scaling["factor"], cfg.rope_scaling["rope_type"]
    if rope_type == "yarn":
        trained = cfg.rope_scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
        return f"original_max_position_embeddings={trained} x yarn RoPE scaling factor {factor}"
    return f"max_position_embeddings={cfg.max_position_embeddings} x linear RoPE scaling factor {factor}"


def num_kv_blocks(config: EngineConfig, runners: list[ModelRunner], max_len: int) -> int:
    """Size the shared pool: explicit count, else the memory budget, capped at what max_num_seqs can use; with a
    warning when one sequence of max_model_len tokens would not fit."""
    num_blocks = _pool_blocks(config, runners, max_len)
    if num_blocks * config.block_size < max_len:
        warnings.warn(
            f"the KV pool holds {num_blocks * config.block_size} tokens, fewer than max_model_len={max_len}: a request "
            "that may need more is refused (raise num_kv_blocks, kv_cache_memory_gb or gpu_memory_utilization, or "
            "lower max_model_len)",
            stacklevel=2,
        )
    return num_blocks


def _pool_blocks(config: EngineConfig, runners: list[ModelRunner], max_len: int) -> int:
    per_block = sum(r.bytes_per_block() for r in runners)
    if config.num_kv_blocks is not None:
        check_fits(config.num_kv_blocks, per_block, runners[0].device)
        return config.num_kv_blocks
    cap = config.max_num_seqs * (-(-(max_len + config.kv_lookahead) // config.block_size)) + 1
    device = runners[0].device
    if config.kv_cache_memory_gb is not None:
        budget = int(config.kv_cache_memory_gb * (1 << 30))
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(free - total * (1 - config.gpu_memory_utilization))
    else:
        budget = CPU_KV_BUDGET_BYTES
    num_blocks = min(budget // per_block, cap)
    if num_blocks < 1:
        raise ValueError(f"no memory left for the KV cache (budget {budget} bytes, {per_block} bytes per block)")
    return num_blocks


def check_fits(num_blocks: int, per_block: int, device: torch.device) -> None:
    """A SettingError naming num_kv_blocks when the pool it asks for is larger than the device's free memory (a
    GPU's) or all of the machine's (the CPU's), rather than the allocator's failure (or the OS's kill) later."""
    if device.type == "cuda":
        room, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        room, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of memory on this machine"
    else:
        return
    if num_blocks * per_block > room:
        raise SettingError(
            "num_kv_blocks",
            f"num_kv_blocks={num_blocks} needs {num_blocks * per_block / (1 << 30):.1f} GiB of KV cache "
            f"({per_block} bytes a block), more than the {room / (1 << 30):.1f} GiB {where}",
        )
