"""Which attention implementation and which KV-cache dtype a device gets."""

from __future__ import annotations

import functools
import os

import torch

_PLAIN_CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def triton_interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its numpy interpreter (CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_installed() -> bool:
    """CPU installs leave Triton out (the engine runs the torch references there); GPU torch builds bring it."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def is_rocm() -> bool:
    return torch.version.hip is not None


def select_attention_backend(device: torch.device | str, requested: str) -> str:
    """Resolve "auto" | "triton" | "torch" to "triton" or "torch" for `device`.

    GPUs (CUDA and ROCm, both `device.type == "cuda"`) run the Triton kernels; the CPU runs the torch
    reference, or the Triton kernels in the interpreter when TRITON_INTERPRET=1 (how CI tests them).
    """
    device = torch.device(device)
    if requested not in ("auto", "triton", "torch"):
        raise ValueError(f"attention_backend must be 'auto', 'triton' or 'torch', got {requested!r}")
    on_gpu = device.type == "cuda"
    if requested == "auto":
        requested = "triton" if on_gpu else "torch"
    if requested == "triton" and not on_gpu and not triton_interpreter_enabled():
        raise ValueError(
            f"attention_backend='triton' needs a GPU; on device {device} set TRITON_INTERPRET=1 "
            "(slow, for tests) or use attention_backend='torch'"
        )
    if requested == "triton" and not triton_installed():
        raise ValueError(
            "the Triton kernels need the `triton` package, which GPU builds of torch bring with them: install "
            "the torch build for your CUDA or ROCm version (or `pip install triton`), or use attention_backend='torch'"
        )
    return requested


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device | str):
    """Map the `kv_cache_dtype` setting to a torch dtype.

    "fp8"/"fp8_e4m3" mean the device's native e4m3 flavour: float8_e4m3fn everywhere except MI300-class
    ROCm GPUs (gfx94x), whose hardware FP8 is float8_e4m3fnuz.
    """
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in _PLAIN_CACHE_DTYPES:
        return _PLAIN_CACHE_DTYPES[kv_cache_dtype]
    if kv_cache_dtype == "fp8_e4m3fnuz":
        return torch.float8_e4m3fnuz
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fnuz if _is_gfx94x(torch.device(device)) else torch.float8_e4m3fn
    raise ValueError(
        f"kv_cache_dtype must be one of 'auto', 'fp8', 'fp8_e4m3', 'fp8_e4m3fnuz', 'bfloat16', 'float16', "
        f"'float32', got {kv_cache_dtype!r}"
    )


def _is_gfx94x(device: torch.device) -> bool:
    if device.type != "cuda" or not is_rocm():
        return False
    arch = torch.cuda.get_device_properties(device).gcnArchName
    return arch.startswith("gfx94")
