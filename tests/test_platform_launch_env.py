import subprocess
import sys

import pytest
import torch

from replay_megatron.platform.distributed import ParallelConfigError, check_parallel_sizes
from replay_megatron.platform.device import DeviceUnavailable, resolve_device
from replay_megatron.platform.launch_env import LaunchEnvError, is_msrun_scheduler, read_launch_env


def test_torchrun_env():
    env = read_launch_env({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
                           "MASTER_PORT": "6000"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 5, 16, 1)
    assert env.init_method == "tcp://10.0.0.2:6000"


def test_msrun_env_maps_scheduler_address_and_device_id():
    env = read_launch_env({"MS_WORKER_NUM": "8", "MS_SCHED_HOST": "node0", "MS_SCHED_PORT": "8118",
                           "RANK_ID": "3", "DEVICE_ID": "3", "MS_ROLE": "MS_WORKER"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("msrun", 3, 8, 3)
    assert env.init_method == "tcp://node0:8118"
    # MS_NODE_ID stands in for RANK_ID in newer msrun versions
    env = read_launch_env({"MS_WORKER_NUM": "2", "MS_SCHED_PORT": "1", "MS_NODE_ID": "1"})
    assert (env.rank, env.local_rank) == (1, 0)


def test_single_process_default():
    env = read_launch_env({})
    assert (env.launcher, env.rank, env.world_size) == ("single", 0, 1)


@pytest.mark.parametrize("environ,match", [
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_PORT": "1"}, "rank 4 outside"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x'"),
    ({"MS_WORKER_NUM": "2", "RANK_ID": "0"}, "MS_SCHED_PORT is not set"),
])
def test_bad_launch_env_names_the_variable(environ, match):
    with pytest.raises(LaunchEnvError, match=match):
        read_launch_env(environ)


def test_msrun_scheduler_process_exits_zero_without_work():
    assert is_msrun_scheduler({"MS_ROLE": "MS_SCHED"}) and not is_msrun_scheduler({"MS_ROLE": "MS_WORKER"})
    proc = subprocess.run([sys.executable, "-m", "replay_megatron", "train", "--no-such-flag"],
                          env={"MS_ROLE": "MS_SCHED", "PATH": ""}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("world,tp,pp,layers,match", [
    (6, 4, 1, None, "world size 6 is not divisible by TP\\*PP = 4\\*1"),
    (8, 2, 2, 3, "num_hidden_layers=3 is not divisible by PP=2"),
    (4, 0, 1, None, "must be >= 1"),
])
def test_parallel_size_errors(world, tp, pp, layers, match):
    with pytest.raises(ParallelConfigError, match=match):
        check_parallel_sizes(world, tp, pp, layers)


def test_parallel_sizes_give_dp():
    assert check_parallel_sizes(16, 4, 2, 36) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without accelerators")
def test_missing_device_is_a_clear_error():
    with pytest.raises(DeviceUnavailable, match="platform.device=npu"):
        resolve_device("npu")
    with pytest.raises(DeviceUnavailable, match="platform.device=cuda"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cpu").backend == "gloo"
