"""Which accelerator this process uses: NPU (torch_npu, HCCL), CUDA (NCCL) or CPU (gloo).

torch_npu is imported lazily, only when the NPU is requested or probed, because it cannot import without
CANN. Choosing `npu` also imports `torch_npu.contrib.transfer_to_npu`, which maps torch.cuda calls onto
the NPU the way MindSpeed does, so megatron-core runs unchanged. Choosing `cpu` activates the CPU adapter
(and, in tests, the device guard that makes the CPU play an accelerator).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

import torch

from replay_megatron.platform import device_guard

DeviceType = Literal["npu", "cuda", "cpu"]
BACKENDS: dict[str, str] = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


class DeviceUnavailable(RuntimeError):
    """A requested accelerator is not present in this process."""


@dataclass(frozen=True)
class Device:
    """The resolved compute device of this process and its collective backend."""

    type: DeviceType
    local_rank: int = 0
    guarded: bool = False  # CPU only: the device guard plays an accelerator (platform.device_guard)

    @property
    def backend(self) -> str:
        return BACKENDS[self.type]

    @property
    def torch_device(self) -> torch.device:
        if self.type == "cpu":
            return device_guard.STAND_IN if self.guarded else torch.device("cpu")
        return torch.device(self.type, self.local_rank)


def npu_available() -> bool:
    """Whether torch_npu imports and sees at least one NPU (never raises)."""
    try:
        torch_npu = importlib.import_module("torch_npu")
    except Exception:  # noqa: BLE001 - no CANN, no driver, or not installed: all mean "no NPU"
        return False
    return bool(torch_npu.npu.is_available())


def resolve_device(requested: str, local_rank: int = 0) -> Device:
    """Map 'auto' | 'npu' | 'cuda' | 'cpu' to the device this process will use, or raise if missing."""
    if requested == "auto":
        requested = "npu" if npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "npu" and not npu_available():
        raise DeviceUnavailable("platform.device=npu but torch_npu is not importable or sees no NPU "
                                "(install the [npu] extra and source CANN's set_env.sh)")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("platform.device=cuda but torch.cuda.is_available() is False")
    if requested not in BACKENDS:
        raise ValueError(f"platform.device={requested!r}; allowed: auto, npu, cuda, cpu")
    return Device(requested, local_rank, guarded=requested == "cpu" and device_guard.requested())  # type: ignore[arg-type]


def activate(device: Device) -> None:
    """Bind this process to its device and install the layer that lets megatron-core run on it."""
    if device.type == "npu":
        importlib.import_module("torch_npu")
        importlib.import_module("torch_npu.contrib.transfer_to_npu")
        torch.npu.set_device(device.local_rank)  # type: ignore[attr-defined]
    elif device.type == "cuda":
        torch.cuda.set_device(device.local_rank)
    else:
        from replay_megatron.platform import cpu_adapter

        cpu_adapter.activate(device.torch_device)
        if device.guarded:
            device_guard.activate()


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` (on the host) on `device`: through pinned memory without waiting on an accelerator, so a
    micro-batch's copies overlap the compute still queued; a plain `.to` on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
