"""Who am I in the job: rank, world size, local rank and rendezvous address, from torchrun's or msrun's env.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. MindSpore's msrun (used on Ascend
clusters) sets MS_WORKER_NUM, MS_SCHED_HOST, MS_SCHED_PORT, RANK_ID (or MS_NODE_ID), DEVICE_ID and
MS_ROLE; it also starts a scheduler process (MS_ROLE=MS_SCHED) that PyTorch does not need, so that process
exits at once and torch's TCP store takes the scheduler's port on the scheduler host. A single process
(no launcher) rendezvous on a free loopback port, or on MASTER_PORT when set, refused at once if taken.
"""
from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import Literal, Mapping

Launcher = Literal["torchrun", "msrun", "single"]


class LaunchEnvError(RuntimeError):
    """The launcher's environment is incomplete or inconsistent; the message names the variable."""


@dataclass(frozen=True)
class LaunchEnv:
    """One process's place in the job and where ranks meet."""

    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def init_method(self) -> str:
        """torch.distributed init_method URL of the rendezvous."""
        return f"tcp://{self.master_addr}:{self.master_port}"


def is_msrun_scheduler(environ: Mapping[str, str] = os.environ) -> bool:
    """True in msrun's scheduler process, which has no work in a PyTorch job and should exit 0."""
    return environ.get("MS_ROLE") == "MS_SCHED"


def free_port() -> int:
    """An unused TCP port on the loopback interface, for MASTER_PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_port(environ: Mapping[str, str]) -> int:
    """MASTER_PORT when set and free on the loopback interface, else a free port."""
    if "MASTER_PORT" not in environ:
        return free_port()
    port = _int(environ, "MASTER_PORT")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise LaunchEnvError(f"MASTER_PORT={port} is already in use (another run on this machine?); unset "
                                 "MASTER_PORT to let a single-process run pick a free port, or choose another") from None
    return port


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None:
        raise LaunchEnvError(f"environment variable {name} is not set")
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={value!r} is not an integer") from None


def _checked(env: LaunchEnv) -> LaunchEnv:
    if env.world_size < 1:
        raise LaunchEnvError(f"{env.launcher}: world size {env.world_size} < 1")
    if not 0 <= env.rank < env.world_size:
        raise LaunchEnvError(f"{env.launcher}: rank {env.rank} outside [0, {env.world_size})")
    if env.local_rank < 0:
        raise LaunchEnvError(f"{env.launcher}: local rank {env.local_rank} < 0")
    return env


def read_launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """The launch environment of this process: torchrun's, msrun's, or a single process (rank 0 of 1)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _checked(LaunchEnv(
            launcher="torchrun",
            rank=_int(environ, "RANK"),
            world_size=_int(environ, "WORLD_SIZE"),
            local_rank=int(environ.get("LOCAL_RANK", "0")),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 29500,
        ))
    if "MS_WORKER_NUM" in environ:
        rank_var = "RANK_ID" if "RANK_ID" in environ else "MS_NODE_ID"
        return _checked(LaunchEnv(
            launcher="msrun",
            rank=_int(environ, rank_var),
            world_size=_int(environ, "MS_WORKER_NUM"),
            local_rank=_int(environ, "DEVICE_ID") if "DEVICE_ID" in environ else 0,
            master_addr=environ.get("MS_SCHED_HOST", "127.0.0.1"),
            master_port=_int(environ, "MS_SCHED_PORT"),
        ))
    return LaunchEnv("single", 0, 1, 0, "127.0.0.1", _single_process_port(environ))
