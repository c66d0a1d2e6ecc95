"""Megatron-vs-Hugging-Face logit parity: the check behind `verify-conversion`, the tests and the CPU job.

One function runs on every rank of a TP x PP job and returns the full-vocabulary logits on the rank that
owns them; `compare_logits` turns reference and candidate logits into the figures users look at.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ParityReport:
    """Largest differences between two sets of logits for the same token batches.

    `max_rel` is the largest absolute difference relative to the largest reference logit (element-wise
    ratios explode on logits near zero and say nothing about the conversion).
    """

    max_abs: float
    max_rel: float
    max_delta_loss: float

    def __str__(self) -> str:
        return (f"max |delta logit| = {self.max_abs:.3e}   max relative = {self.max_rel:.3e}   "
                f"max |delta loss| = {self.max_delta_loss:.3e}")


def megatron_logits_on_rank(hf: Mapping[str, Any], hf_sd: Mapping[str, torch.Tensor],
                            micro_batches: list[torch.Tensor], tp: int, pp: int, device: str = "cpu"):
    """Build the Megatron Qwen3 for this rank, load HF weights, return full logits on (last stage, tp 0)."""
    from replay_megatron.models.conversion import load_hf_into_model
    from replay_megatron.models.forward import full_logits
    from replay_megatron.models.qwen3 import build_model, transformer_config
    from replay_megatron.platform.distributed import initialize, shutdown

    layout = initialize(device=device, tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    model = build_model(hf, transformer_config(hf, tp=tp, pp=pp, cpu_initialization=True),
                        pre_process=layout.is_first_stage, post_process=layout.is_last_stage)
    model.to(layout.device.torch_device)
    load_hf_into_model(model, hf_sd, hf, tp=tp, tp_rank=layout.tp_rank)
    model.eval()
    batches = [t.to(layout.device.torch_device) for t in micro_batches]
    logits = [x.cpu() for x in full_logits(model, batches, hf["vocab_size"])]
    shutdown()
    return logits if layout.is_last_stage and layout.tp_rank == 0 else None


def sequence_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy per sequence, [b]."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return ce.view(tokens.shape[0], -1).mean(dim=1)


def compare_logits(reference: list[torch.Tensor], candidate: list[torch.Tensor],
                   micro_batches: list[torch.Tensor]) -> ParityReport:
    """Max abs/relative logit difference and max per-sequence loss difference over all micro-batches."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference vs {len(candidate)} candidate micro-batches")
    max_abs = max_rel = max_loss = 0.0
    for ref, cand, tokens in zip(reference, candidate, micro_batches):
        if ref.shape != cand.shape:
            raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
        diff = (ref.float() - cand.float()).abs()
        max_abs = max(max_abs, diff.max().item())
        max_rel = max(max_rel, diff.max().item() / ref.float().abs().max().clamp_min(1e-30).item())
        max_loss = max(max_loss, (sequence_losses(ref, tokens) - sequence_losses(cand, tokens)).abs().max().item())
    return ParityReport(max_abs, max_rel, max_loss)
