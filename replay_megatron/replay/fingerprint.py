"""sha256 fingerprints that tie a replay store to the model, tokenizer and data it was collected from.

Under TP/PP each rank holds only a shard of the weights, so `fingerprint_state_dict` of a megatron model
depends on the parallel layout. The collect command therefore fingerprints the base checkpoint as files:
`fingerprint_files([hf_checkpoint_dir])` (safetensors + config.json + tokenizer files, read once, about
1 s per GB), the same on every rank and for every TP/PP/DP. All digests are lowercase hex, like
`replay_megatron.config.config_fingerprint`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

_BLOCK = 1 << 20


def fingerprint_json(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, no spaces), e.g. a tokenizer vocab or a config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _named_files(paths: Iterable[str | os.PathLike]) -> list[tuple[str, Path]]:
    named: dict[str, Path] = {}
    for path in map(Path, paths):
        if path.is_dir():
            found = [(f.relative_to(path).as_posix(), f) for f in path.rglob("*")
                     if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)]
        elif path.is_file():
            found = [(path.name, path)]
        else:
            raise FileNotFoundError(f"cannot fingerprint {path}: no such file or directory")
        for name, file in found:
            if name in named:
                raise ValueError(f"cannot fingerprint: two inputs are both named {name!r} ({named[name]}, {file})")
            named[name] = file
    return sorted(named.items())


def fingerprint_files(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the names, sizes and bytes of files; a directory stands for every file below it.

    Names are relative to a directory argument (a file argument is named by its base name), so the digest
    does not depend on where the checkpoint lives. Hidden files and directories (e.g. `.cache/`) are skipped.
    """
    digest = hashlib.sha256()
    for name, file in _named_files(paths):
        digest.update(name.encode("utf-8") + b"\0" + file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def fingerprint_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted names, shapes, dtypes and bytes of the tensors (one rank's shard under TP/PP)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(cfg) -> str:
    """The manifest's `model` fingerprint of the configured base model (see the module doc)."""
    from replay_megatron.config import model_hf_config

    if cfg.model.mcore_checkpoint is not None:
        return fingerprint_files([cfg.input_path(cfg.model.mcore_checkpoint)])
    if cfg.model.hf_path is not None:
        return fingerprint_files([cfg.input_path(cfg.model.hf_path)])
    return fingerprint_json({"preset_config": model_hf_config(cfg), "seed": cfg.run.seed})
