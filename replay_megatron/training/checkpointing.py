"""Training checkpoints: weights, optimizer state and the data position, in the layout of `run_dir`.

Weights go through `models.checkpoint.save_megatron` (megatron-core distributed checkpoint: they load at
any TP/PP). The optimizer state is megatron's own `sharded_state_dict` (MoClip's moments and step
included): the plain and mixed-precision optimizers' state maps to the model's sharded tensors and
reshards to any TP/PP like the weights; the distributed optimizer's (in the format that
`mcore_compat.optimizer_sharded_state_dict` picks) loads only at the TP/PP it was saved at, so a resume
at another layout then keeps weights and data position and starts fresh optimizer state (and says so).
`train_state.json` is written last and `checkpoints/latest` after it, so a checkpoint a crash cut short
is never resumed from.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch.distributed as dist

from replay_megatron.atomic_io import atomic_write_json, atomic_write_text
from replay_megatron.mcore_compat import optimizer_sharded_state_dict
from replay_megatron import run_dir as layout_of_run


@dataclass
class TrainState:
    """What a resume needs besides weights and optimizer state (all plain JSON)."""

    step: int = 0  # optimizer steps taken (skipped non-finite steps included: they consumed data)
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)  # OptimizerParamScheduler.state_dict()
    parallel: dict[str, Any] = field(default_factory=dict)  # tp, pp, dp, distributed_optimizer
    config_fingerprint: str = ""

    def count_step(self, skipped: bool, global_batch_size: int) -> None:
        """Account for one optimizer step (a skipped non-finite step still consumed its data)."""
        self.step += 1
        self.consumed_samples += global_batch_size
        self.skipped_steps += int(skipped)
        self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if skipped else 0


def _sharded_optimizer_state(model, optimizer, is_loading: bool) -> dict:
    return optimizer_sharded_state_dict(optimizer, model.module.sharded_state_dict(), is_loading)


def save_checkpoint(run_dir: str | Path, state: TrainState, model, optimizer, hf: Mapping[str, Any]) -> Path:
    """Save the state after `state.step` (collective over all ranks); returns the checkpoint dir."""
    from megatron.core import dist_checkpointing

    from replay_megatron.models.checkpoint import _sync_torch_dist_strategy, save_megatron

    root = Path(run_dir) / layout_of_run.CHECKPOINTS
    directory = root / layout_of_run.checkpoint_name(state.step)
    if dist.get_rank() == 0 and directory.exists():  # a save that a crash interrupted, or a re-run
        shutil.rmtree(directory)
    dist.barrier()
    save_megatron(model.module, directory / "model", hf)
    (directory / "optimizer").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_sharded_optimizer_state(model, optimizer, False), str(directory / "optimizer"),
                            sharded_strategy=_sync_torch_dist_strategy())
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write_json(directory / layout_of_run.TRAIN_STATE, asdict(state))
        atomic_write_text(root / layout_of_run.LATEST, directory.name + "\n")
    dist.barrier()
    return directory


def save_initial_weights(run_dir: str | Path, model, hf: Mapping[str, Any]) -> Path:
    """`checkpoints/iter_0000000/model`: the starting weights of a run from random init (eval's base)."""
    from replay_megatron.models.checkpoint import save_megatron

    directory = Path(run_dir) / layout_of_run.CHECKPOINTS / layout_of_run.checkpoint_name(0) / "model"
    save_megatron(model.module, directory, hf)
    return directory


def read_train_state(checkpoint: Path) -> TrainState:
    """The `train_state.json` of a checkpoint dir, naming the file if it is unreadable."""
    import json

    path = checkpoint / layout_of_run.TRAIN_STATE
    try:
        fields = json.loads(path.read_text())
        fields.pop("moclip_counts", None)  # written by earlier versions; the optimizer checkpoint holds them
        return TrainState(**fields)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable train state ({e})") from None


def load_checkpoint(checkpoint: Path, model, optimizer, hf: Mapping[str, Any],
                    parallel: Mapping[str, Any]) -> tuple[TrainState, bool]:
    """Load weights (any layout) and the optimizer state when it can be resharded to `parallel` (see the
    module doc).

    Returns the saved TrainState and whether the optimizer state was loaded. The optimizer must exist
    (its sharded state is the loading template); when its state is not loaded, its fp32 main params are
    refreshed from the loaded weights (`reload_model_params`).
    """
    from megatron.core import dist_checkpointing

    from replay_megatron.models.checkpoint import load_megatron
    from replay_megatron.optim.megatron import load_optimizer_state

    state = read_train_state(checkpoint)
    load_megatron(model.module, checkpoint / "model", hf)
    saved = dict(state.parallel)
    same_layout = saved == dict(parallel)
    reshardable = not (saved.get("distributed_optimizer") or parallel.get("distributed_optimizer"))
    if same_layout or reshardable:
        loaded = dist_checkpointing.load(_sharded_optimizer_state(model, optimizer, True),
                                         str(checkpoint / "optimizer"))
        load_optimizer_state(optimizer, loaded)
    else:
        optimizer.reload_model_params()  # fp32 main params from the loaded weights
    return state, same_layout or reshardable


class Checkpointer:
    """The checkpoints of one run: where a run starts (a resume or fresh), and when and what it saves.

    Owns the save cadence (`should_save`: every `save_interval` steps before the last; the loop saves the
    last step itself). The scheduler's state travels in TrainState; MoClip's clip counts with the optimizer's.
    """

    def __init__(self, run_dir: Path, hf: Mapping[str, Any], *, save_interval: int, total_steps: int,
                 parallel: Mapping[str, Any], config_fingerprint: str, rank: int) -> None:
        self.run_dir, self.hf, self.save_interval, self.total_steps = Path(run_dir), hf, save_interval, total_steps
        self.parallel, self.config_fingerprint, self.rank = dict(parallel), config_fingerprint, rank

    def should_save(self, step: int) -> bool:
        return bool(self.save_interval) and step % self.save_interval == 0 and step < self.total_steps

    def save(self, state: TrainState, model, optimizer, scheduler) -> Path:
        state.scheduler = scheduler.state_dict()
        return save_checkpoint(self.run_dir, state, model, optimizer, self.hf)

    def start(self, model, optimizer, scheduler, *, random_init: bool) -> TrainState:
        """The state to continue from: the latest checkpoint when there is one (weights, optimizer state when
        it reshards to this layout, scheduler, data position), else step 0; a fresh run from random weights
        first saves them (`eval`'s base)."""
        latest = layout_of_run.latest_checkpoint(self.run_dir)
        if latest is None:
            if random_init:
                save_initial_weights(self.run_dir, model, self.hf)
            return TrainState(parallel=dict(self.parallel), config_fingerprint=self.config_fingerprint)
        state, optimizer_loaded = load_checkpoint(latest, model, optimizer, self.hf, self.parallel)
        scheduler.load_state_dict(state.scheduler)
        if self.rank == 0:
            fresh = "" if optimizer_loaded else (f"; saved at layout {state.parallel}, now {self.parallel}: weights "
                                                 "and data position loaded, optimizer state starts fresh")
            print(f"[train] resuming {self.run_dir} from {latest.name} (step {state.step}, "
                  f"{state.consumed_samples} samples){fresh}", flush=True)
        state.parallel = dict(self.parallel)
        return state
