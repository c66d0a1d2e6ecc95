"""The CPU adapter: lets megatron-core (written for CUDA) run on CPU under gloo, for CI and the demo.

megatron-core has no CPU path: it allocates on `torch.cuda.current_device()`, hard-codes `device="cuda"`
in a few factory calls, moves tensors with `.cuda()`, dispatches mixed precision on `tensor.type()`
strings such as 'torch.cuda.FloatTensor', and keeps its RNG tracker in CUDA generator states. On CPU the
"accelerator" is the CPU itself, so each of these is redirected to the CPU and nothing else changes:
the numerics are those of the same megatron-core code.

`activate()` applies exactly these patches, once per process, and only when the platform is `cpu`
(never on CUDA or NPU; there torch_npu's `transfer_to_npu` plays the same role for NPU):

1. `torch.cuda.current_device()` -> `"cpu"` (`"cpu:0"` under the device guard, `platform.device_guard`):
   the device megatron passes to every allocation.
2. `torch.cuda.is_available()` stays as is (False); megatron only reads it for optional features.
3. Factory functions (`torch.tensor/zeros/ones/empty/full/arange/..._like`) map a `device` that names
   cuda to that same compute device: megatron's optimizer, grad-norm, schedules and checkpoint code hard-code `device='cuda'`.
4. `Tensor.cuda()` returns the tensor itself (it is already on the compute device; under the guard, its
   copy on the stand-in device).
5. `Tensor.type()` (no argument) names CPU tensors the CUDA way ('torch.cuda.FloatTensor'): megatron's
   optimizer wrappers pick their mixed-precision branch by that string.
6. `torch.cuda.synchronize`, `torch.cuda.empty_cache` -> no-ops; `torch.cuda.nvtx.range_push/pop` ->
   no-ops (profiling markers).
7. megatron's RNG tracker is replaced by `CpuRNGStatesTracker`, which forks the CPU generator instead of
   a CUDA one, so `model_parallel_cuda_manual_seed` and `get_cuda_rng_tracker().fork()` work unchanged.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch

_ACTIVE = False
_ORIGINAL_FACTORIES: dict[str, Callable] = {}

FACTORY_FUNCTIONS = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
                     "randint", "zeros_like", "ones_like", "empty_like", "full_like", "eye", "linspace")

# Tensor.type() of CPU tensors -> the CUDA spelling megatron compares against.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _names_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _redirect_device(fn: Callable, compute: torch.device) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _names_cuda(kwargs.get("device")):
            kwargs["device"] = compute
        return fn(*args, **kwargs)

    wrapper.__replay_megatron_cpu_adapter__ = True  # type: ignore[attr-defined]
    return wrapper


def _tensor_type(original: Callable) -> Callable:
    @functools.wraps(original)
    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, *args, **kwargs)

    return type_


def _noop(*_: Any, **__: Any) -> None:
    return None


def _cpu_rng_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """megatron's RNG tracker with the CPU generator standing in for the CUDA one."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise KeyError(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def install_cpu_rng_tracker() -> None:
    """Make megatron's global RNG tracker a CPU one (patch 7); `model_parallel_cuda_manual_seed` then works."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def activate(compute: torch.device = torch.device("cpu")) -> None:
    """Apply the patches listed in the module docstring (idempotent). Call only for the CPU platform.

    `compute` is the device "cuda" maps to: the CPU, or the device guard's stand-in accelerator ('cpu:0',
    the same memory under another name, so the guard can tell device tensors from host ones).
    """
    global _ACTIVE
    if _ACTIVE:
        return
    name_of_compute = str(compute)
    torch.cuda.current_device = lambda: name_of_compute  # type: ignore[assignment]
    for name in FACTORY_FUNCTIONS:
        _ORIGINAL_FACTORIES[name] = getattr(torch, name)
        setattr(torch, name, _redirect_device(_ORIGINAL_FACTORIES[name], compute))
    if compute.index is None:
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[assignment]
    else:
        torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(compute)  # type: ignore[assignment]
    torch.Tensor.type = _tensor_type(torch.Tensor.type)  # type: ignore[assignment]
    torch.cuda.synchronize = _noop  # type: ignore[assignment]
    torch.cuda.empty_cache = _noop  # type: ignore[assignment]
    torch.cuda.nvtx.range_push = _noop  # type: ignore[assignment]
    torch.cuda.nvtx.range_pop = _noop  # type: ignore[assignment]
    install_cpu_rng_tracker()
    _ACTIVE = True


@contextlib.contextmanager
def factories_restored():
    """torch's own factory functions for the duration (patch 3 undone): for Hugging Face `from_pretrained`,
    which, loaded first under the wrappers, gives a model whose `generate` output is garbage (same weights)."""
    wrapped = {name: getattr(torch, name) for name in _ORIGINAL_FACTORIES}
    for name, fn in _ORIGINAL_FACTORIES.items():
        setattr(torch, name, fn)
    try:
        yield
    finally:
        for name, fn in wrapped.items():
            setattr(torch, name, fn)


def is_active() -> bool:
    """Whether `activate()` has run in this process."""
    return _ACTIVE
