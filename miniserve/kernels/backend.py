"""Which implementation of a kernel op runs: the Triton kernel or its torch reference.

One vocabulary for every op and for the engine's `attention_backend` setting: "auto" (Triton on GPUs, CUDA and
ROCm alike, both `device.type == "cuda"`; the torch reference on the CPU), "triton" (forced; on the CPU it needs
Triton's interpreter, TRITON_INTERPRET=1, which is how CI tests the kernels) or "torch".
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


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


def resolve_backend(device: torch.device | str, backend: str) -> str:
    """Resolve "auto" | "triton" | "torch" to "triton" or "torch" for `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    on_gpu = torch.device(device).type == "cuda"
    if backend == "auto":
        backend = "triton" if on_gpu else "torch"
    if backend == "triton" and not on_gpu and not triton_interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs a GPU; on device {device} set TRITON_INTERPRET=1 (slow, for tests) "
            "or use backend='torch'"
        )
    if backend == "triton" and not triton_installed():
        raise ValueError(
            "the Triton kernels need the `triton` package, which GPU builds of torch bring with them: install "
            "the torch build for your CUDA or ROCm version (or `pip install triton`), or use backend='torch'"
        )
    return backend


def use_triton(device: torch.device | str, backend: str) -> bool:
    return resolve_backend(device, backend) == "triton"
