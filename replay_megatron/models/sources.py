"""Where a model stage's weights come from: a megatron checkpoint (`save_megatron` dir, any TP/PP), an HF
directory, or for a config `model.mcore_checkpoint` / `model.hf_path` / none (a preset's random
initialisation, seeded by `run.seed`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch


def load_weights(model: torch.nn.Module, path: str | Path, hf: Mapping[str, Any], layout) -> None:
    """Load a `save_megatron` dir (any TP/PP; collective) or an HF dir (this rank reads only its stage's
    tensors) into this rank's stage `model`; an HF dir whose architecture differs from `hf` is refused."""
    from replay_megatron.models.checkpoint import (
        META_FILE, LazySafetensors, check_same_model, load_megatron, read_hf_config)
    from replay_megatron.models.conversion import load_hf_into_model

    path = Path(path)
    if (path / META_FILE).is_file():
        load_megatron(model, path, hf)
        return
    check_same_model(read_hf_config(path), hf, str(path / "config.json"))
    load_hf_into_model(model, LazySafetensors(path), hf, tp=layout.tp, tp_rank=layout.tp_rank)


def load_configured_weights(cfg, model: torch.nn.Module, hf: Mapping[str, Any], layout) -> str | None:
    """Load the config's starting weights into this rank's stage; returns their path, or None when the
    model keeps its random initialisation (a preset without a checkpoint)."""
    source = cfg.model.mcore_checkpoint if cfg.model.mcore_checkpoint is not None else cfg.model.hf_path
    if source is None:
        return None
    path = cfg.input_path(source)
    load_weights(model, path, hf, layout)
    return str(path)


def build_loaded_stage(cfg, hf: Mapping[str, Any], layout, weights: str | Path | None = None) -> torch.nn.Module:
    """This rank's stage for forward-only work (Stage 0, eval), in eval mode: weights from the directory
    `weights` when given, else from the config's source (or its seeded random initialisation)."""
    from replay_megatron.models.qwen3 import build_stage

    model = build_stage(hf, layout, params_dtype=cfg.model.params_dtype,
                        vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
    if weights is None:
        load_configured_weights(cfg, model, hf, layout)
    else:
        load_weights(model, weights, hf, layout)
    return model.eval()
