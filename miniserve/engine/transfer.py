"""Host <-> device copies that never stall the GPU.

`torch.tensor(values, device="cuda")` copies from pageable host memory, and CUDA performs a stream
synchronisation before such a copy: the host waits until every kernel already queued has finished. In the step loop
that serialises host and GPU work (the host cannot prepare the next pass while the GPU runs the current one), which
costs more than the kernels themselves for a small model. Staging through pinned memory makes the copy an ordinary
asynchronous operation on the stream; the caching host allocator keeps the staging buffer alive until it is done.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of `values` (nested lists of numbers) on `device`, copied without a host-GPU synchronisation."""
    host = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return host if device.type == "cpu" else host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_host_async(t: torch.Tensor) -> torch.Tensor:
    """A copy of device tensor `t` into pinned host memory, queued on the stream, not waited for: read it once an
    event recorded after it has completed (a plain `.tolist()` would wait for everything queued, later work too)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
