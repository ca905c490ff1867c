"""GPU power and energy through NVML, read with ctypes from the driver's own library
(`libnvidia-ml.so.1`), so no Python binding has to be installed. Where NVML is missing (no NVIDIA
driver, CPU machines) `open_gpu` returns None and callers leave the figures out.

Energy comes from `nvmlDeviceGetTotalEnergyConsumption` (millijoules since the driver loaded,
Volta and newer): the difference over a timed region is the energy the board drew in it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

NVML_SUCCESS = 0


def _library():
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    return lib if lib.nvmlInit_v2() == NVML_SUCCESS else None


@dataclass
class Gpu:
    lib: ctypes.CDLL
    handle: ctypes.c_void_p

    def energy_j(self) -> float | None:
        """Joules drawn since the driver loaded; None where the board does not count energy."""
        value = ctypes.c_ulonglong()
        if self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(value)) != NVML_SUCCESS:
            return None
        return value.value / 1000

    def power_w(self) -> float | None:
        value = ctypes.c_uint()
        if self.lib.nvmlDeviceGetPowerUsage(self.handle, ctypes.byref(value)) != NVML_SUCCESS:
            return None
        return value.value / 1000


def driver_version() -> str | None:
    lib = _library()
    if lib is None:
        return None
    buffer = ctypes.create_string_buffer(96)
    if lib.nvmlSystemGetDriverVersion(buffer, ctypes.c_uint(len(buffer))) != NVML_SUCCESS:
        return None
    return buffer.value.decode()


def open_gpu(device: str) -> Gpu | None:
    """NVML's handle for a torch CUDA device, found by PCI bus id (so CUDA_VISIBLE_DEVICES and
    NVML's own numbering cannot disagree); None without NVML or off CUDA."""
    if not device.startswith("cuda"):
        return None
    lib = _library()
    if lib is None:
        return None
    import torch

    index = torch.device(device).index
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0".encode()
    handle = ctypes.c_void_p()
    if lib.nvmlDeviceGetHandleByPciBusId_v2(ctypes.c_char_p(bus_id), ctypes.byref(handle)) != NVML_SUCCESS:
        return None
    return Gpu(lib, handle)
