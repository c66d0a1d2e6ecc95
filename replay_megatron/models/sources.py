"""Where a configured model's starting weights come from: `model.mcore_checkpoint`, `model.hf_path`, or
none (a preset's random initialisation, seeded by `run.seed`)."""
from __future__ import annotations

from typing import Any, Mapping

import torch


def load_configured_weights(cfg, model: torch.nn.Module, hf: Mapping[str, Any], layout) -> str | None:
    """Load this rank's stage of the configured weights into `model` (collective for a megatron
    checkpoint); returns the source path, or None when the model keeps its random initialisation."""
    if cfg.model.mcore_checkpoint is not None:  # any TP/PP (megatron-core distributed checkpoint)
        from replay_megatron.models.checkpoint import load_megatron

        path = cfg.input_path(cfg.model.mcore_checkpoint)
        load_megatron(model, path, hf)
        return str(path)
    if cfg.model.hf_path is not None:  # each rank reads only its stage's tensors
        from replay_megatron.models.checkpoint import LazySafetensors
        from replay_megatron.models.conversion import load_hf_into_model

        path = cfg.input_path(cfg.model.hf_path)
        load_hf_into_model(model, LazySafetensors(path), hf, tp=layout.tp, tp_rank=layout.tp_rank)
        return str(path)
    return None
