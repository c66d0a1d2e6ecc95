"""launch/ scripts: the command line and environment each would start, with fake launchers on PATH.

Each script is run for real (its `plan` check included) against a fake `torchrun` / `msrun` that prints
its argv and the environment variables the scripts are responsible for; DRY_RUN=1 must print the same
command without starting anything. Configs that fail `plan` must stop the launch.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
CFG_8B = "configs/paper/qwen3_8b/topk_moclip.yaml"
CFG_TINY = "configs/cpu/tiny_tp2pp1.yaml"
ENV_SHOWN = ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "PYTORCH_NPU_ALLOC_CONF", "TASK_QUEUE_ENABLE",
             "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS", "FAKE_CANN")
FAKE_LAUNCHER = """#!/usr/bin/env bash
echo "FAKE-LAUNCHER $(basename "$0")"
for a in "$@"; do echo "ARG $a"; done
for v in {names}; do echo "ENV $v=${{!v-<unset>}}"; done
"""


@pytest.fixture
def env(tmp_path):
    """PATH with fake torchrun/msrun first, PYTHON = this interpreter, a fake CANN set_env.sh."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "msrun"):
        (bin_dir / name).write_text(FAKE_LAUNCHER.format(names=" ".join(ENV_SHOWN)))
        (bin_dir / name).chmod(0o755)
    cann = tmp_path / "set_env.sh"
    cann.write_text('export FAKE_CANN="sourced:${SOME_UNSET_VARIABLE}"\n')  # must survive `set -u`
    base = {k: v for k, v in os.environ.items() if k not in ENV_SHOWN and not k.startswith(("NNODES", "NODE_RANK",
                                                                                              "MASTER_", "NPUS"))}
    return {**base, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
            "CANN_SET_ENV": str(cann)}


def run(script: str, args: list[str], env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env={**env, **extra},
                          capture_output=True, text=True, timeout=120)


def launched(out: str) -> tuple[list[str], dict[str, str]]:
    """(argv after the launcher name, env) printed by the fake launcher."""
    argv = [line[4:] for line in out.splitlines() if line.startswith("ARG ")]
    shown = dict(line[4:].split("=", 1) for line in out.splitlines() if line.startswith("ENV "))
    return argv, shown


def announced(out: str) -> list[str]:
    """The command the script printed on its `== launch:` line."""
    (line,) = [line for line in out.splitlines() if line.startswith("== launch:")]
    return shlex.split(line[len("== launch:"):])


def test_torchrun_910b_two_nodes(env):
    args = ["train", CFG_8B, "optimizer.lr=2e-6", "--resume", "run.seed=2"]
    node = dict(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.7", MASTER_PORT="6000", HCCL_EXEC_TIMEOUT="3600",
                CUDA_DEVICE_MAX_CONNECTIONS="8")
    expected = ["--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8", "--master-addr", "10.0.0.7",
                "--master-port", "6000", "-m", "replay_megatron", "train", CFG_8B, "platform.device=npu",
                "optimizer.lr=2e-6", "run.seed=2", "--resume"]
    res = run("torchrun_910b.sh", args, env, **node)
    assert res.returncode == 0, res.stderr
    assert "layout: world 16 = TP 4 x PP 2 x DP 2" in res.stdout      # the plan, before the launch
    assert res.stdout.index("verdict: OK") < res.stdout.index("FAKE-LAUNCHER torchrun")
    argv, shown = launched(res.stdout)
    assert argv == expected and announced(res.stdout) == ["torchrun", *expected]
    assert shown == {"HCCL_CONNECT_TIMEOUT": "1200", "HCCL_EXEC_TIMEOUT": "3600",  # a set value is kept
                     "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "TASK_QUEUE_ENABLE": "2",
                     "CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "<unset>", "FAKE_CANN": "sourced:"}
    dry = run("torchrun_910b.sh", args, env, DRY_RUN="1", **node)
    assert dry.returncode == 0 and "FAKE-LAUNCHER" not in dry.stdout and "DRY_RUN=1: not started" in dry.stdout
    assert announced(dry.stdout) == ["torchrun", *expected]


def test_msrun_910b(env):
    node = dict(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.7", NPUS_PER_NODE="4", LOG_DIR="/tmp/ms logs")
    res = run("msrun_910b.sh", ["collect", CFG_8B, "collect.k_max=100"], env, **node)
    assert res.returncode == 0, res.stderr
    assert "layout: world 8 = TP 4 x PP 2 x DP 1" in res.stdout
    argv, shown = launched(res.stdout)
    assert argv == ["--worker_num=8", "--local_worker_num=4", "--master_addr=10.0.0.7", "--master_port=8118",
                    "--node_rank=1", "--log_dir=/tmp/ms logs", "--join=True", "--cluster_time_out=600",
                    "python", "-m", "replay_megatron", "collect", CFG_8B, "platform.device=npu", "collect.k_max=100"]
    assert shown["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and shown["FAKE_CANN"] == "sourced:"
    dry = run("msrun_910b.sh", ["collect", CFG_8B, "collect.k_max=100"], env, DRY_RUN="1", **node)
    assert "FAKE-LAUNCHER" not in dry.stdout and announced(dry.stdout) == ["msrun", *argv]


def test_cpu_gloo(env):
    res = run("cpu_gloo.sh", ["train", CFG_TINY, "run.data_root=/tmp/x"], env, NPROC="2", MASTER_PORT="29999")
    assert res.returncode == 0, res.stderr
    assert "layout: world 2 = TP 2 x PP 1 x DP 1" in res.stdout
    argv, shown = launched(res.stdout)
    assert argv == ["--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                    "29999", "-m", "replay_megatron", "train", CFG_TINY, "platform.device=cpu", "run.data_root=/tmp/x"]
    assert shown["OMP_NUM_THREADS"] == "1" and shown["FAKE_CANN"] == "<unset>"   # no Ascend set-up on CPU


@pytest.mark.parametrize("script", ["torchrun_910b.sh", "msrun_910b.sh", "cpu_gloo.sh"])
def test_invalid_config_stops_the_launch(env, script):
    res = run(script, ["train", CFG_TINY, "parallel.pipeline_model_parallel_size=3"], env, NPROC="3")
    assert res.returncode == 2
    assert "PP must divide the model's num_hidden_layers = 4" in res.stderr
    assert "config check failed: not launching" in res.stderr and "FAKE-LAUNCHER" not in res.stdout


def test_usage_error(env):
    res = run("cpu_gloo.sh", ["train"], env)
    assert res.returncode == 2 and res.stderr.startswith("usage: cpu_gloo.sh SUBCOMMAND CONFIG")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_are_shellcheck_clean():
    res = subprocess.run(["shellcheck", "-x", *sorted(str(p) for p in LAUNCH.glob("*.sh"))], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
