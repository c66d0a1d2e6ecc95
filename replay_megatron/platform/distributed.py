"""Bring up one process of a job: device, torch.distributed, megatron-core parallel state and RNG.

`initialize()` is the only entry point every subcommand uses, so torchrun, msrun and the CPU test
launcher all go through the same path; `ParallelLayout` answers "who am I" afterwards.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

from replay_megatron import mcore_compat
from replay_megatron.platform.device import Device, activate, resolve_device
from replay_megatron.platform.launch_env import LaunchEnv, read_launch_env
from replay_megatron.platform.mindspeed import apply_mindspeed_adaptor


class ParallelConfigError(ValueError):
    """The requested TP/PP does not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelLayout:
    """This process's coordinates in the TP x PP x DP grid."""

    device: Device
    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        """One line for logs: sizes, this rank's coordinates and the device."""
        return (f"world {self.world_size} = TP{self.tp} x PP{self.pp} x DP{self.dp} on {self.device.type} "
                f"({self.device.backend}); rank {self.rank}: tp {self.tp_rank}, pp {self.pp_rank}, dp {self.dp_rank}")


def check_parallel_sizes(world_size: int, tp: int, pp: int, num_layers: int | None = None) -> int:
    """Validate TP/PP against the world size (and layer count); returns DP."""
    if tp < 1 or pp < 1:
        raise ParallelConfigError(f"tensor/pipeline parallel sizes must be >= 1, got TP={tp} PP={pp}")
    if world_size % (tp * pp):
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by TP*PP = {tp}*{pp} = {tp * pp}")
    if num_layers is not None and num_layers % pp:
        raise ParallelConfigError(f"num_hidden_layers={num_layers} is not divisible by PP={pp}")
    return world_size // (tp * pp)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's model-parallel RNG tracker (same offsets as Megatron-LM)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def initialize(*, device: str = "auto", tp: int = 1, pp: int = 1, seed: int = 1234,
               num_layers: int | None = None, timeout_minutes: int = 30, mindspeed_adaptor: str = "auto",
               environ: Mapping[str, str] = os.environ) -> ParallelLayout:
    """Initialise this process for a TP x PP x DP job launched by torchrun, msrun or as one process.

    `mindspeed_adaptor`: `platform.mindspeed_adaptor` (auto | on | off, see `platform.mindspeed`).
    """
    mcore_compat.check_version()
    env: LaunchEnv = read_launch_env(environ)
    check_parallel_sizes(env.world_size, tp, pp, num_layers)
    dev = resolve_device(device, env.local_rank)
    activate(dev)
    apply_mindspeed_adaptor(mindspeed_adaptor, dev.type)
    if not dist.is_initialized():
        dist.init_process_group(backend=dev.backend, init_method=env.init_method, rank=env.rank,
                                world_size=env.world_size, timeout=datetime.timedelta(minutes=timeout_minutes))
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        mcore_compat.initialize_model_parallel(tp, pp, timeout_minutes)
    seed_everything(seed)
    return current_layout(dev)


def current_layout(device: Device) -> ParallelLayout:
    """The layout of the already initialised megatron parallel state."""
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        device=device, world_size=dist.get_world_size(), rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank())


def shutdown() -> None:
    """Tear down megatron's parallel state and the process group (tests start several jobs per process)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
