"""Every difference between the megatron-core versions we support (0.12.x, as pinned by MindSpeed-LLM,
up to 0.16.1), and between the `emerging-optimizers` releases its Muon runs on, lives here; the rest of
replay-megatron calls these wrappers and never branches on a version.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import typing
from typing import Any, Callable, Iterator

import megatron.core
from packaging.version import Version

MCORE_VERSION = Version(megatron.core.__version__)
MIN_VERSION, MAX_VERSION = Version("0.12.0"), Version("0.16.1")


def check_version() -> None:
    """Refuse a megatron-core outside the supported range before any model is built."""
    if not MIN_VERSION <= MCORE_VERSION <= MAX_VERSION:
        raise RuntimeError(f"megatron-core {MCORE_VERSION} is not supported; "
                           f"replay-megatron supports {MIN_VERSION} to {MAX_VERSION}")


def accepted_kwargs(fn: Callable, **kwargs: Any) -> dict[str, Any]:
    """The subset of `kwargs` that `fn` accepts (arguments added in later megatron-core releases)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def initialize_model_parallel(tp: int, pp: int, timeout_minutes: int = 30) -> None:
    """megatron's parallel_state.initialize_model_parallel with the arguments both versions share."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes)


def local_layer_spec(qk_layernorm: bool = True) -> Any:
    """GPT layer spec built from megatron-core's own modules (no Transformer Engine), RMSNorm."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")


def te_layer_spec(qk_layernorm: bool = True) -> Any:
    """GPT layer spec with Transformer Engine modules (CUDA with TE installed only)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


@contextlib.contextmanager
def inner_adam_class(cls: type) -> Iterator[None]:
    """Within the block, megatron-core's `get_megatron_optimizer(optimizer='adam')` instantiates
    `cls(params=param_groups, lr=, weight_decay=, betas=, eps=, ...)` instead of its Adam.

    0.16 picks `torch.optim.AdamW`/`torch.optim.Adam` when neither Transformer Engine nor Apex is
    installed, else the module-level `Adam` of `megatron.core.optimizer` (with `adam_w_mode`); 0.12
    calls that module-level `Adam` (torch's AdamW as the fallback). The DistributedOptimizer asserts
    `isinstance(optimizer, (Adam, torch.optim.AdamW))` with its own module-level `Adam`. All these names
    are substituted, so `cls` must be a class (a MoClip subclass).
    """
    import torch
    import megatron.core.optimizer as mcore_optimizer
    import megatron.core.optimizer.distrib_optimizer as mcore_distrib_optimizer

    targets = [(torch.optim, "AdamW"), (torch.optim, "Adam"), (mcore_optimizer, "Adam"),
               (mcore_distrib_optimizer, "Adam")]
    saved = [getattr(owner, name) for owner, name in targets]
    try:
        for owner, name in targets:
            setattr(owner, name, cls)
        yield
    finally:
        for (owner, name), original in zip(targets, saved):
            setattr(owner, name, original)


def get_megatron_optimizer(config: Any, model_chunks: list) -> Any:
    """megatron-core's `get_megatron_optimizer(config, model_chunks)`, with its distributed optimizer usable
    without Transformer Engine (`_quantize_no_fp8_params_without_te`)."""
    from megatron.core.optimizer import get_megatron_optimizer as build

    _quantize_no_fp8_params_without_te()
    return build(config, model_chunks)


def _quantize_no_fp8_params_without_te() -> None:
    """Let the DistributedOptimizer step without Transformer Engine (CPU, NPU).

    Its every step calls `fp8_utils.quantize_param_shard` on the FP8 parameters it found. 0.16's TE-less
    fallback returns for an empty list; 0.12's raises "Invalid Transformer Engine version for FP8
    distributed optimizer" unconditionally. No config field avoids the call in 0.12 (the
    precision-aware optimizer skips it but needs TE's FusedAdam), so, only where the installed fallback
    raises for no FP8 parameters, it is replaced by 0.16's: nothing to do without FP8 parameters, the
    original (and its error) with them. `quantize_param_shard` looks the implementation up at call time.
    """
    from megatron.core import fp8_utils

    original = fp8_utils._quantize_param_shard_impl
    try:
        original([], [], [], None)
        return  # already a no-op without FP8 parameters (0.16, or Transformer Engine installed)
    except RuntimeError:
        pass

    def quantize_param_shard_impl(model_params: list, *args: Any, **kwargs: Any) -> None:
        if len(model_params) > 0:
            original(model_params, *args, **kwargs)

    fp8_utils._quantize_param_shard_impl = quantize_param_shard_impl


_DP_ZERO = "dp_zero_gather_scatter"


def optimizer_sharded_state_dict(optimizer: Any, model_sharded_state_dict: dict, is_loading: bool) -> dict:
    """`optimizer.sharded_state_dict(...)` in a format that megatron-core's own torch_dist strategy saves
    and loads back, for every wrapper (fp32, mixed precision, distributed).

    The distributed optimizer's default format (`fully_sharded_model_space`) carries flattened ranges:
    0.16's torch_dist load refuses them, and 0.12's dist_checkpointing handles them with `np.product`,
    gone in NumPy 2. 0.16 takes the format as `metadata` and gets `dp_reshardable` (Megatron-LM's
    choice); 0.12's wrappers take no `metadata` (its FP32Optimizer refuses it), and its
    DistributedOptimizer gets `sharding_type='dp_zero_gather_scatter'` (state gathered on DP rank 0, one
    object per TP x PP rank: Megatron-LM 0.12's format without fully parallel save).
    """
    from megatron.core.optimizer import MegatronOptimizer

    if "metadata" in inspect.signature(MegatronOptimizer.sharded_state_dict).parameters:
        return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                            metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    wrappers = getattr(optimizer, "chained_optimizers", [optimizer])  # a chain passes the format on
    distributed = all("sharding_type" in inspect.signature(w.sharded_state_dict).parameters for w in wrappers)
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                        **({"sharding_type": _DP_ZERO} if distributed else {}))


def load_optimizer_state_dict(optimizer: Any, state_dict: dict) -> None:
    """`optimizer.load_state_dict(state_dict)` for the state that `dist_checkpointing.load` returned for
    `optimizer_sharded_state_dict(..., is_loading=True)`.

    The `dp_zero_gather_scatter` param state holds each parameter's fp32 copy, `exp_avg` and
    `exp_avg_sq`, while megatron-core copies into every entry of the inner optimizer's per-parameter
    state: a torch-style `step` (MoClip's, torch's AdamW's) raises KeyError there. So the distributed
    optimizer loads everything else first (its param groups carry the step, and it sets every
    per-parameter `step` from them), then its param state with `step` set aside.
    """
    if not isinstance(state_dict, dict) or state_dict.get("param_state_sharding_type") != _DP_ZERO:
        optimizer.load_state_dict(state_dict)
        return
    [distributed] = getattr(optimizer, "chained_optimizers", [optimizer])
    optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "param_state"})
    states = list(distributed.optimizer.state.values())
    steps = [state.pop("step", None) for state in states]
    distributed.load_parameter_state_from_dp_zero(state_dict["param_state"])
    for state, step in zip(states, steps):
        if step is not None:
            state["step"] = step


def grad_stats_group(optimizer: Any) -> Any:
    """The process group a megatron-core optimizer wrapper reduces its gradient norm over."""
    if hasattr(optimizer, "get_grad_stats_parallel_group"):
        return optimizer.get_grad_stats_parallel_group()
    return optimizer.get_model_parallel_group()  # releases before get_grad_stats_parallel_group


class MuonUnavailable(RuntimeError):
    """megatron-core's Muon cannot be used here; the message says what is missing."""


MUON_MIN_VERSION = Version("0.16.0")
MUON_INSTALL = ("pip install emerging-optimizers absl-py (Python >= 3.12); on Python 3.10/3.11: "
                "pip install --no-deps --ignore-requires-python emerging-optimizers==0.3.0 absl-py")


def megatron_muon() -> Any:
    """megatron-core's Muon module (`megatron.core.optimizer.muon`, from 0.16) with the `emerging-optimizers`
    package it runs on imported; `MuonUnavailable` naming what is missing otherwise.

    emerging-optimizers 0.2+ declares Python >= 3.12 but uses nothing newer than `typing.override`; on
    Python 3.10/3.11 that name is given typing_extensions' identical decorator before the import.
    """
    if MCORE_VERSION < MUON_MIN_VERSION:
        raise MuonUnavailable(f"megatron-core {MCORE_VERSION} has no Muon (optimizer/muon.py arrived in "
                              f"{MUON_MIN_VERSION}); install megatron-core {MUON_MIN_VERSION}-{MAX_VERSION}")
    if sys.version_info < (3, 12) and not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
    try:
        importlib.import_module("emerging_optimizers.orthogonalized_optimizers")
    except ImportError as e:
        raise MuonUnavailable(f"megatron-core's Muon needs the emerging-optimizers package ({e}): "
                              f"{MUON_INSTALL}") from e
    muon = importlib.import_module("megatron.core.optimizer.muon")
    if not muon.HAVE_EMERGING_OPTIMIZERS:  # imported before emerging-optimizers could be
        muon = importlib.reload(muon)
    return muon


def muon_unavailable_reason() -> str | None:
    """Why megatron-core's Muon cannot be used here, or None when it can."""
    try:
        megatron_muon()
    except MuonUnavailable as e:
        return str(e)
    return None


def newton_schulz_tp(x: Any, *, steps: int, coefficient_type: str, tp_group: Any, partition_dim: int | None,
                     tp_mode: str) -> Any:
    """emerging-optimizers' tensor-parallel Newton-Schulz: its `tp_mode` was named `mode` before 0.2 (the
    release megatron-core 0.16's own Muon calls it with)."""
    from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz_tp as ns

    mode = {"tp_mode": tp_mode} if "tp_mode" in inspect.signature(ns).parameters else {"mode": tp_mode}
    return ns(x, steps=steps, coefficient_type=coefficient_type, tp_group=tp_group, partition_dim=partition_dim,
              **mode)


@contextlib.contextmanager
def muon_optimizer_class(cls: type) -> Iterator[None]:
    """Within the block, megatron-core's `get_megatron_muon_optimizer` instantiates `cls` (with its
    TensorParallelMuon arguments) for the 2-D weights instead of its TensorParallelMuon."""
    muon = megatron_muon()
    original = muon.TensorParallelMuon
    muon.TensorParallelMuon = cls
    try:
        yield
    finally:
        muon.TensorParallelMuon = original
