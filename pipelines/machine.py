"""What GPUs this machine has, without importing torch (validation must stay under a second).

Read through NVML (`nvidia-ml-py`), which the NVIDIA driver provides: no driver library means no
NVIDIA GPU. `CUDA_VISIBLE_DEVICES` narrows what a process may use, as it does for torch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    sm: int  # compute capability as major * 10 + minor (90 for an H100)


@functools.cache
def gpus() -> tuple[Gpu, ...]:
    """The GPUs this process may use, in CUDA's order where CUDA_VISIBLE_DEVICES lists indices."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return ()  # no NVIDIA driver on this machine
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append(Gpu(name.decode() if isinstance(name, bytes) else name, major * 10 + minor))
    finally:
        pynvml.nvmlShutdown()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return tuple(found)
    chosen = []
    for item in (v.strip() for v in visible.split(",")):
        if not item.isdigit() or int(item) >= len(found):
            break  # CUDA stops at the first invalid entry (UUIDs are not resolved here: counted as none)
        chosen.append(found[int(item)])
    return tuple(chosen)


def gpu_count() -> int:
    return len(gpus())


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity, where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
