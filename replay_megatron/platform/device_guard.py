"""The device guard: on CPU, fail where an accelerator run would fail because a tensor is on the wrong side.

On CPU every tensor sits on the one device and gloo reduces any dtype, so code that would break on a GPU or
NPU passes here: a host tensor handed to an NCCL/HCCL collective, a host tensor meeting a device tensor in
an op (`torch.equal`, `torch.stack`, matmul, ...), a float64 collective (HCCL has none), `.numpy()` of a
device tensor. With `REPLAY_MEGATRON_DEVICE_GUARD=1` in the environment, the CPU platform plays an
accelerator and checks for all of these, without changing any numerics (every op still runs as it is):

- The stand-in accelerator is `torch.device("cpu", 0)` (`STAND_IN`): the platform device, and what the CPU
  adapter maps megatron's `"cuda"` to. Tensors on it are "device" tensors.
- A "host" tensor is what would live in host memory on a real accelerator: made by a factory call naming no
  device or plain `cpu` (`torch.zeros(2)`, `torch.as_tensor(array)`, `from_numpy`), or by `.cpu()` /
  `.to("cpu")`. Results of ops on host tensors only are host tensors; `.to(STAND_IN)` / `.cuda()` make
  device tensors, and `t.device` of a device tensor reads `STAND_IN` (so `device=t.device` follows `t`). Tensors made inside C++ (autograd, loaded checkpoints) count as device tensors, so the
  guard can miss a bug but never flags correct code for that reason.
- Mixing is refused as CUDA refuses it: a host tensor of any rank with a device tensor, except a 0-d host
  tensor in an elementwise op, host indices in indexing, and the copies between the two sides.
- Collectives (`torch.distributed.all_reduce`, `all_gather*`, `reduce_scatter*`, `broadcast`, point-to-point)
  refuse host tensors and dtypes HCCL cannot reduce or move (float64, complex); object collectives (which
  pickle through host tensors by design) are exempt.

A violation raises `DeviceGuardError` naming the op and the offending tensor. The guard is a test mode: it
slows every torch call, and is never active on a real accelerator.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ENV_VAR = "REPLAY_MEGATRON_DEVICE_GUARD"
STAND_IN = torch.device("cpu", 0)
_HOST_ATTR = "_replay_megatron_host"
_DEVICE_PROPERTY = torch.Tensor.device
_UNREDUCIBLE = (torch.float64, torch.complex64, torch.complex128)
_TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
                       "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
                       "broadcast", "reduce", "all_to_all", "all_to_all_single", "send", "recv",
                       "batch_isend_irecv", "gather", "scatter")
# isend/irecv stay unwrapped: P2POp checks its `op` by identity; their tensors are checked in batch_isend_irecv.
_HOST_CONSTRUCTORS = ("from_numpy", "frombuffer")
_OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
                       "send_object_list", "recv_object_list")
# CUDA accepts a 0-d CPU tensor as a scalar operand of elementwise (TensorIterator) ops only.
_ELEMENTWISE = frozenset(
    "add sub mul div true_divide floor_divide remainder fmod pow where clamp clamp_min clamp_max maximum minimum "
    "eq ne lt le gt ge logical_and logical_or logical_xor bitwise_and bitwise_or bitwise_xor lerp addcmul "
    "addcdiv atan2 copysign neg abs sqrt rsqrt exp log masked_fill fill radd rsub rmul rdiv rtruediv rpow "
    "iadd isub imul idiv itruediv and or xor rand ror rxor".split())
_INDEXING = frozenset({"__getitem__", "__setitem__", "index_put", "index_put_"})
# moves between the sides (`to`, `cpu`, `cuda`) are handled apart; these take `self`'s side
_COPIES = frozenset({"copy_", "pin_memory", "is_pinned", "new_tensor", "new_zeros", "new_ones", "new_empty",
                     "new_full"})

_state = threading.local()
_ACTIVE = False


class DeviceGuardError(RuntimeError):
    """A tensor is on the side (host / accelerator) where a real accelerator run would refuse it."""


def requested(environ: Any = os.environ) -> bool:
    """Whether the environment asks for the guard (`REPLAY_MEGATRON_DEVICE_GUARD=1`)."""
    return environ.get(ENV_VAR, "0") not in ("", "0", "false", "False")


def is_host(t: torch.Tensor) -> bool:
    """Whether the guard counts `t` as a host tensor."""
    return bool(getattr(t, _HOST_ATTR, False))


def _mark(value: Any, host: bool) -> Any:
    for t in tree_flatten(value)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _HOST_ATTR, host)
            except (AttributeError, RuntimeError):  # some C++-owned tensors take no attributes
                pass
    return value


def _describe(t: torch.Tensor) -> str:
    return f"{'host' if is_host(t) else 'device'} tensor {t.dtype} {tuple(t.shape)}"


def _names_host(device: Any) -> bool:
    """Whether a `device=` argument names the host (None / 'cpu'), not the stand-in ('cpu:0')."""
    if device is None:
        return True
    device = torch.device(device) if isinstance(device, (str, int)) else device
    return isinstance(device, torch.device) and device.type == "cpu" and device.index is None


def _target_device(args: tuple, kwargs: dict) -> Any:
    """The device a `Tensor.to(...)` call moves to (None if it only changes dtype), or a tensor to follow."""
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            return a
        if isinstance(a, torch.Tensor):
            return a
    return None


def _op_name(func: Callable) -> str:
    return getattr(func, "__name__", str(func))


class _Guard(TorchFunctionMode):
    """Tags host tensors and refuses the mixes a real accelerator refuses (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is _DEVICE_PROPERTY:  # `device=t.device` must name the side `t` is on
            return torch.device("cpu") if is_host(args[0]) else STAND_IN
        name = _op_name(func)
        if name in ("cpu", "to", "cuda"):
            return self._move(func, name, args, kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if is_host(t)]
        device = [t for t in tensors if not is_host(t)]
        if name == "numpy" and device:
            raise DeviceGuardError(f"Tensor.numpy() of a {_describe(device[0])}: move it to the host first")
        if host and device:
            self._check_mix(name, host, device)
        out = func(*args, **kwargs)
        if not tensors:  # a factory call: host unless it names the accelerator
            return _mark(out, _names_host(kwargs.get("device")))
        if name in _COPIES or name in _INDEXING:  # indexing, copy_, new_*: the side of `self`
            return _mark(out, is_host(args[0])) if isinstance(args[0], torch.Tensor) else out
        return _mark(out, bool(host) and not device)

    @staticmethod
    def _check_mix(name: str, host: list, device: list) -> None:
        bare = name.strip("_")
        if name in _COPIES or name in _INDEXING:
            return
        if bare in _ELEMENTWISE and all(t.dim() == 0 for t in host):
            return
        raise DeviceGuardError(f"{name}: a {_describe(host[0])} meets a {_describe(device[0])}; on an "
                               "accelerator this raises (tensors on two devices): move it to the device first")

    @staticmethod
    def _move(func, name: str, args: tuple, kwargs: dict):
        source = args[0]
        out = func(*args, **kwargs)
        if name == "cpu":
            to_host = True
        elif name == "cuda":  # torch's own, where the CPU adapter did not replace it
            to_host = False
        else:
            target = _target_device(args, kwargs)
            if target is None:
                return _mark(out, is_host(source)) if out is not source else out
            to_host = is_host(target) if isinstance(target, torch.Tensor) else _names_host(target)
        if out is source and is_host(source) != to_host:
            out = source.clone()  # the same CPU tensor on the other side: a distinct object, like a real copy
        return _mark(out, to_host)


def _check_collective(name: str, value: Any) -> None:
    if getattr(_state, "in_object_collective", False):
        return
    items = [getattr(v, "tensor", v) for v in tree_flatten(value)[0]]  # P2POp lists carry .tensor
    for t in items:
        if not isinstance(t, torch.Tensor):
            continue
        if is_host(t):
            raise DeviceGuardError(f"torch.distributed.{name}: a {_describe(t)} is handed to the collective; "
                                   "NCCL/HCCL take device tensors only")
        if t.dtype in _UNREDUCIBLE:
            raise DeviceGuardError(f"torch.distributed.{name}: {_describe(t)}: HCCL has no {t.dtype} "
                                   "collectives (use platform.exact_sum for float64 sums)")


def _guarded_collective(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_collective(name, (args, kwargs))
        return fn(*args, **kwargs)

    return wrapper


def _host_constructor(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _mark(fn(*args, **kwargs), True)

    return wrapper


def _object_collective(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        outer = getattr(_state, "in_object_collective", False)
        _state.in_object_collective = True
        try:
            return fn(*args, **kwargs)
        finally:
            _state.in_object_collective = outer

    return wrapper


def activate() -> None:
    """Start the guard in this process (idempotent): the torch-function mode and the collective checks."""
    global _ACTIVE
    if _ACTIVE:
        return
    for name in _TENSOR_COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _guarded_collective(name, getattr(dist, name)))
    for name in _OBJECT_COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _object_collective(getattr(dist, name)))
    for name in _HOST_CONSTRUCTORS:  # not routed through torch-function modes
        setattr(torch, name, _host_constructor(getattr(torch, name)))
    _Guard().__enter__()  # for the rest of the process, like the CPU adapter's patches
    _ACTIVE = True
