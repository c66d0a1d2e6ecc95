"""Qwen3 checkpoints: Hugging Face safetensors dirs <-> megatron-core distributed checkpoints (any TP/PP).

The Megatron side is megatron-core's distributed-checkpoint format (`dist_checkpointing`, torch_dist
strategy) written from `model.sharded_state_dict()`, so a checkpoint saved at one TP/PP loads at another.
Beside it, `replay_megatron.json` records the HF config (so export and later loads know the model) and the
TP/PP it was written at; loading refuses a model whose config differs, naming the field.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from replay_megatron.atomic_io import atomic_write_json
from replay_megatron.models.qwen3 import check_qwen3, check_tp_fits

META_FILE = "replay_megatron.json"
FORMAT_VERSION = 1
# HF config fields that decide tensor shapes or numerics; a checkpoint loads only into a model that agrees.
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "intermediate_size", "tie_word_embeddings",
               "rms_norm_eps", "rope_theta", "rope_parameters", "attention_bias")
# HF `torch_dtype` (4.x) / `dtype` (5.x) -> replay_megatron.models.qwen3.DTYPES key.
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the model it is loaded into; the message names the field or tensor."""


# --- Hugging Face directories ------------------------------------------------------------------------

def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """`config.json` of an HF Qwen3 directory, refused unless it is Qwen3."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is {hf_dir} a Hugging Face model directory?)")
    hf = json.loads(path.read_text())
    check_qwen3(hf, source=str(path))
    return hf


def hf_params_dtype(hf: Mapping[str, Any]) -> str:
    """The DTYPES key matching the checkpoint's dtype (fp32 when the config does not say)."""
    return _HF_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), "fp32")


class LazySafetensors(Mapping[str, torch.Tensor]):
    """The tensors of an HF safetensors dir (sharded via model.safetensors.index.json, or one file),
    read one at a time on access, so each rank reads only the tensors of its own stage/shard."""

    def __init__(self, hf_dir: str | os.PathLike) -> None:
        root = Path(hf_dir)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            self._files = {k: root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (root / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(root / "model.safetensors", framework="pt") as f:
                self._files = {k: root / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{root}: neither model.safetensors.index.json nor model.safetensors")

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._files[key], framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def write_hf_dir(out_dir: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], hf: Mapping[str, Any]) -> None:
    """Write `model.safetensors` (tmp file + rename) and `config.json` for `from_pretrained`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    atomic_write_json(out / "config.json", dict(hf))


# --- Megatron distributed checkpoints -----------------------------------------------------------------

def _parallel_sizes() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


def _sync_torch_dist_strategy():
    """megatron's torch_dist save strategy, writing synchronously with PyTorch's plain FileSystemWriter.

    The default torch_dist writer (FileSystemWriterAsync) starts a spawn-context multiprocessing Manager
    and forks writer processes on every rank; under gloo on CPU (forking ranks with live gloo threads) that
    hung for minutes in our tests. The files are the same PyTorch DCP format, so megatron's torch_dist
    *load* strategy reads them unchanged and reshards to any TP/PP.
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict)

    class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            dcp.save(mcore_to_pyt_state_dict(state, False),
                     storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                     planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                              flatten_state_dict=False))

    return SyncTorchDistSaveStrategy("torch_dist", 1)


def save_megatron(model: torch.nn.Module, directory: str | os.PathLike, hf: Mapping[str, Any]) -> None:
    """Save this rank's part of `model` (collective over all ranks) and, on rank 0, `replay_megatron.json`."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(directory), sharded_strategy=_sync_torch_dist_strategy())
    tp, pp = _parallel_sizes()
    if dist.get_rank() == 0:
        atomic_write_json(directory / META_FILE, {"format_version": FORMAT_VERSION, "hf_config": dict(hf),
                                                  "tensor_model_parallel_size": tp,
                                                  "pipeline_model_parallel_size": pp})
    dist.barrier()


def read_megatron_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """`replay_megatron.json` of a checkpoint written by `save_megatron`."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {directory} was not written by replay-megatron's save_megatron")
    return json.loads(path.read_text())


def check_same_model(saved: Mapping[str, Any], wanted: Mapping[str, Any], source: str) -> None:
    """Refuse when an architecture field of the saved HF config differs from the model's."""
    for field in ARCH_FIELDS:
        if saved.get(field) != wanted.get(field):
            raise CheckpointMismatch(f"{source}: hf_config.{field}={saved.get(field)!r} but the model "
                                     f"being loaded has {field}={wanted.get(field)!r}")


def _check_shapes(sharded_state_dict: Mapping[str, Any], directory: Path) -> None:
    """Every tensor the model wants exists in the checkpoint with the same global shape."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(directory))
    for sh in nested_values(sharded_state_dict):
        if not isinstance(sh, ShardedTensor):
            continue
        if sh.key not in saved:
            raise CheckpointMismatch(f"{directory}: checkpoint has no tensor {sh.key!r}")
        if tuple(saved[sh.key].global_shape) != tuple(sh.global_shape):
            raise CheckpointMismatch(f"{directory}: tensor {sh.key!r} has global shape "
                                     f"{tuple(saved[sh.key].global_shape)}, the model expects {tuple(sh.global_shape)}")


def load_megatron(model: torch.nn.Module, directory: str | os.PathLike, hf: Mapping[str, Any]) -> dict[str, Any]:
    """Load a checkpoint saved at any TP/PP into this rank's `model` (collective); returns its metadata."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    meta = read_megatron_meta(directory)
    check_same_model(meta["hf_config"], hf, str(directory / META_FILE))
    sharded = model.sharded_state_dict()
    _check_shapes(sharded, directory)
    state = dist_checkpointing.load(sharded, str(directory))
    model.load_state_dict(state, strict=False)
    return meta


# --- Conversion jobs (one function per rank) ----------------------------------------------------------

def hf_to_megatron(hf_dir: str, out_dir: str, tp: int, pp: int, device: str = "cpu") -> None:
    """On each of TP*PP ranks: build this stage of the model, load its HF shard, save it (dist checkpoint)."""
    from replay_megatron.models.conversion import load_hf_into_model
    from replay_megatron.models.qwen3 import build_stage
    from replay_megatron.platform.distributed import initialize, shutdown

    hf = read_hf_config(hf_dir)
    check_tp_fits(hf, tp)
    layout = initialize(device=device, tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    try:
        model = build_stage(hf, layout, params_dtype=hf_params_dtype(hf))
        load_hf_into_model(model, LazySafetensors(hf_dir), hf, tp=tp, tp_rank=layout.tp_rank)
        save_megatron(model, out_dir, hf)
    finally:
        shutdown()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run `fn(*args)` here when launched by torchrun/msrun with `world_size` ranks, else spawn that many
    local processes (a fresh process even for 1 rank: megatron's global state and the CPU adapter stay out
    of the caller)."""
    from replay_megatron.platform.launch_env import read_launch_env
    from replay_megatron.platform.spawn import run_local

    env = read_launch_env()
    if env.launcher != "single":
        if env.world_size != world_size:
            raise ValueError(f"launched with {env.world_size} ranks but this job needs TP*PP = {world_size}")
        return [fn(*args)]
    return run_local(fn, world_size, *args)


def convert_hf_to_megatron(hf_dir: str, out_dir: str, tp: int, pp: int, device: str = "cpu") -> None:
    """`hf_to_megatron` on TP*PP ranks, after checking the config in this process (clear errors first)."""
    hf = read_hf_config(hf_dir)
    check_tp_fits(hf, tp)
    if hf["num_hidden_layers"] % pp:
        raise ValueError(f"num_hidden_layers={hf['num_hidden_layers']} is not divisible by PP={pp}")
    run_on_ranks(hf_to_megatron, tp * pp, hf_dir, out_dir, tp, pp, device)
