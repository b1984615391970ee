"""Programmatic dependent launch (PDL) for a decoder layer's chain of small kernels (NVIDIA Hopper and newer).

Why: a decode step at small batch is ~140 short kernels back to back, and each pays its launch and ramp-up only
after the kernel before it has drained. Launched as a programmatic dependent, a kernel's programs are scheduled
while the kernel before is still finishing, and wait on the device (`griddepcontrol.wait`) until that kernel has
completed and its writes are visible. CUDA graphs capture the dependency as it is.

The rule that keeps it correct: every kernel launched so calls `wait_for_previous` before it reads or writes
anything (and `release_dependents` somewhere, else the next one is scheduled only when it ends). Then, when a
kernel touches memory, the kernel before it has completed, which itself waited for the one before it, and so on:
all earlier work is done, as with ordinary launches. A kernel launched the ordinary way (cuBLAS, torch, NCCL) waits
for everything before it, as always. Nothing is computed differently: only the gaps between launches shrink
(benchmarks/pdl_chain.py; the README's Performance section).
"""

from __future__ import annotations

import torch

from miniserve.kernels.backend import is_rocm, triton_interpreter_enabled

# Passes of up to this many tokens (decode steps of batches up to 64, their speculative rounds, short prompts) launch
# as dependents, their projections on the Triton GEMM, whose launch settings are tuned up to 64 rows
# (kernels/linear.py). On an H200 a layer's kernel chain launched so beats cuBLAS at 1, 16 and 64 rows
# (`pdl_chain_h200.json`); with every pass launched so (`dependent_launch_all_passes_h200.json`) nano's batches of 256
# gained nothing (their kernels are long, and cuBLAS's big-tile GEMMs cannot be launched so).
DEPENDENT_MAX_TOKENS = 64

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: nothing launches
    triton = None


def dependent_launch_supported(device: torch.device) -> bool:
    """Hopper (sm_90) and newer NVIDIA GPUs: the `griddepcontrol` instructions and the launch attribute exist."""
    if triton is None or device.type != "cuda" or is_rocm() or triton_interpreter_enabled():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(pdl: bool) -> dict:
    """Keyword arguments of a Triton launch: `launch_pdl` only when asked (other backends do not know it)."""
    return {"launch_pdl": True} if pdl else {}


if triton is not None:

    @triton.jit
    def release_dependents(USE_PDL: tl.constexpr):
        """Let the next kernel's programs be scheduled now (they wait in `wait_for_previous` until this kernel has
        completed). Short kernels call it first; long ones once their main loop is done, so that the programs of
        kernels further down the chain do not sit on the GPU's resources while this one still needs them."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def wait_for_previous(USE_PDL: tl.constexpr):
        """Before a kernel launched as a dependent reads or writes anything: wait until the kernel before it has
        completed and its writes are visible (a no-op when not launched so)."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
