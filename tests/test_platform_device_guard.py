"""The device guard (platform.device_guard): the CPU plays an accelerator and refuses what NCCL/HCCL or a
GPU would refuse, without changing numbers.

Unit cases run in a spawned process (the guard patches the process for good); the pipeline cases run the
real `collect` / `train` (replay + MoClip, replay + KL, full + AdamW) / `eval` commands under torchrun with
the guard on, at TP2 and at PP2, and check a guarded run's losses equal an unguarded one's bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replay_megatron.platform.device_guard import ENV_VAR
from replay_megatron.platform.spawn import run_local
from replay_megatron import run_dir as layout_of_run
from train_fixtures import make_training_root


def _guarded_world(names: list[str]) -> dict[str, str]:
    """Run guard cases in a 2-rank CPU world; returns case -> 'ok' or the DeviceGuardError's text."""
    import torch.distributed as dist

    from replay_megatron.platform.device_guard import DeviceGuardError
    from replay_megatron.platform.distributed import initialize
    from replay_megatron.platform.exact_sum import all_reduce_float64

    layout = initialize(device="cpu")
    device = layout.device.torch_device
    on_device = torch.arange(4, dtype=torch.float32, device=device)
    cases = {
        "host_collective": lambda: dist.all_reduce(torch.ones(2)),
        "float64_collective": lambda: dist.all_reduce(on_device.double()),
        "equal_across_sides": lambda: torch.equal(on_device, torch.arange(4, dtype=torch.float32)),
        "stack_across_sides": lambda: torch.stack([on_device.sum(), torch.tensor(1.0)]),
        "numpy_of_device": lambda: on_device.numpy(),
        "device_of_t_follows_t": lambda: dist.all_reduce(torch.zeros(2, device=on_device.device)),
        "scalar_operand": lambda: on_device * torch.tensor(2.0) + torch.tensor(1.0),
        "host_indices": lambda: on_device[torch.tensor([0, 2])],
        "moved_to_device": lambda: dist.all_reduce(torch.ones(2).to(device)),
        "moved_to_host": lambda: torch.equal(on_device.cpu(), torch.arange(4, dtype=torch.float32)),
        "exact_sum": lambda: all_reduce_float64(torch.tensor([1e16, 1.0], dtype=torch.float64, device=device)),
    }
    results = {}
    for name in names:
        try:
            value = cases[name]()
        except DeviceGuardError as e:
            results[name] = str(e)
            continue
        if name == "exact_sum":  # 1e16 + 1 is not representable in fp32, nor their doubled sum
            assert value.tolist() == [2e16, 2.0], value
        results[name] = "ok"
    return results


REFUSED = {"host_collective": "host tensor", "float64_collective": "HCCL has no torch.float64",
           "equal_across_sides": "equal: a host tensor", "stack_across_sides": "stack: a host tensor",
           "numpy_of_device": "Tensor.numpy() of a device tensor"}
ALLOWED = ["device_of_t_follows_t", "scalar_operand", "host_indices", "moved_to_device", "moved_to_host",
           "exact_sum"]


@pytest.mark.multiproc
def test_guard_refuses_what_an_accelerator_refuses_and_allows_the_rest():
    names = list(REFUSED) + ALLOWED
    for results in run_local(_guarded_world, 2, names, env={ENV_VAR: "1"}):
        for case, message in REFUSED.items():
            assert message in results[case], (case, results[case])
        assert {case: results[case] for case in ALLOWED} == dict.fromkeys(ALLOWED, "ok")
    # without the variable the guard is off: gloo takes the host tensor and the float64 collective
    unguarded = run_local(_guarded_world, 2, ["host_collective", "float64_collective"], env={ENV_VAR: "0"})
    assert unguarded == [{"host_collective": "ok", "float64_collective": "ok"}] * 2


def _cli(root: Path, *args: str, nproc: int, guard: bool) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "replay_megatron", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", ENV_VAR: "1" if guard else "0"}
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in layout_of_run.read_jsonl(run / layout_of_run.METRICS)]


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["parallel.tensor_model_parallel_size=2",
                                    "parallel.pipeline_model_parallel_size=2"])
def test_pipeline_runs_under_the_guard(tmp_path, layout):
    """collect, train (replay + MoClip, replay + KL, full + AdamW, replay + AdaMuon / MuonClip) and eval run with the CPU as an
    accelerator; the guard changes no number (replay run guarded == unguarded, bit for bit)."""
    config = str(make_training_root(tmp_path))
    common = [layout, "collect.store_logits=fp16", "train.eval_interval=3"]
    _cli(tmp_path, "collect", config, *common, "--no-progress", nproc=2, guard=True)
    runs = {"replay": [], "kl": ["train.kl_weight=0.5"], "full": ["train.loss=full", "optimizer.name=adamw"],
            "adamuon": ["optimizer.name=adamuon", "train.train_iters=2"],
            "muonclip": ["optimizer.name=muonclip", "train.train_iters=2"]}
    for name, extra in runs.items():
        _cli(tmp_path, "train", config, *common, *extra, f"run.name={name}", nproc=2, guard=True)
    _cli(tmp_path, "eval", config, *common, "run.name=replay", nproc=2, guard=True)
    assert json.loads((tmp_path / "runs" / "replay" / layout_of_run.EVAL).read_text())["relative_l2"] > 0
    _cli(tmp_path, "train", config, *common, "run.name=unguarded", nproc=2, guard=False)
    assert _losses(tmp_path / "runs" / "replay") == _losses(tmp_path / "runs" / "unguarded")
