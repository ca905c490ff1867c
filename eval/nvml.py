"""GPU energy (the benchmark's energy per token and mean power) and the driver version through NVML,
read with NVIDIA's own binding (`nvidia-ml-py`: the `pynvml` module, pure Python over the driver's
`libnvidia-ml.so.1`). Where NVML is missing or does not start (no NVIDIA driver, CPU machines)
`open_gpu` and `driver_version` return None and callers leave the figures out.

Energy comes from `nvmlDeviceGetTotalEnergyConsumption` (millijoules since the driver loaded,
Volta and newer): the difference over a timed region is the energy the board drew in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pynvml


def _started() -> bool:
    """Whether NVML is loaded and initialised (each call initialises it once more, as NVML counts)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver library, or a driver that does not answer: no NVML figures
        return False
    return True


@dataclass
class Gpu:
    handle: pynvml.c_nvmlDevice_t

    def energy_j(self) -> float | None:
        """Joules drawn since the driver loaded; None where the board does not count energy."""
        try:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000
        except pynvml.NVMLError:
            return None


def driver_version() -> str | None:
    if not _started():
        return None
    try:
        return pynvml.nvmlSystemGetDriverVersion()
    except pynvml.NVMLError:
        return None


def open_gpu(device: str) -> Gpu | None:
    """NVML's handle for a torch CUDA device, found by PCI bus id (so CUDA_VISIBLE_DEVICES and
    NVML's own numbering cannot disagree); None without NVML or off CUDA."""
    if not device.startswith("cuda") or not _started():
        return None
    import torch

    index = torch.device(device).index
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    try:
        return Gpu(pynvml.nvmlDeviceGetHandleByPciBusId(bus_id))
    except pynvml.NVMLError:
        return None
