"""Kernels: the single KV write path (`reshape_and_cache`), paged attention and the fused layer ops.

Each op has a pure-torch reference (reference.py, fp8.py, the `*_reference` functions; used on the CPU and as the
test oracle) beside a Triton kernel (used on CUDA/ROCm GPUs, and on the CPU under TRITON_INTERPRET=1). ops.py
dispatches between them (backend.py says which runs); this module only re-exports.
"""

from miniserve.kernels.backend import resolve_backend, use_triton
from miniserve.kernels.fp8 import (
    dequantize_fp8_reference,
    fp8_format,
    fp8_max,
    is_fp8,
    quantize_fp8_reference,
)
from miniserve.kernels.metadata import AttentionMetadata
from miniserve.kernels.ops import paged_attention, reshape_and_cache
from miniserve.kernels.reference import paged_attention_reference, reshape_and_cache_reference

__all__ = [
    "AttentionMetadata",
    "dequantize_fp8_reference",
    "fp8_format",
    "fp8_max",
    "is_fp8",
    "paged_attention",
    "paged_attention_reference",
    "quantize_fp8_reference",
    "reshape_and_cache",
    "reshape_and_cache_reference",
    "resolve_backend",
    "use_triton",
]
