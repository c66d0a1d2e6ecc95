"""The one table of optimizers a config can name (`optimizer.name`), read by the config schema, `plan`'s
memory estimate and `train`.

Data only, importing nothing from the project, so the config layer can read it without pulling in torch
or megatron-core. `builder` is the name `optim.megatron.build_optimizer` takes.
"""
from __future__ import annotations

from dataclasses import dataclass

# optimizer.* fields every optimizer reads: the schedule, decoupled weight decay, moments, grad-norm clip.
COMMON_FIELDS = frozenset({"name", "lr", "min_lr", "lr_schedule", "warmup_iters", "weight_decay", "betas",
                           "clip_grad"})


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: the optimizer.* fields it reads besides COMMON_FIELDS (a config setting any other is
    refused), its fp32 states per parameter on (2-D transformer matrices, everything else), and how
    `train` builds it. Where `eps` is a field, `train` passes optimizer.eps (else MoClip keeps its atan2).
    `muon`: built on megatron-core's Muon (0.16+ with emerging-optimizers; no distributed optimizer, no
    fp16), which `train` checks before any work."""

    name: str
    fields: frozenset[str]
    states: tuple[int, int]
    builder: str
    muon: bool = False


OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (
    OptimizerSpec("moclip", frozenset({"max_angle", "atan2_a", "atan2_b", "clip_mode"}), (2, 2), "moclip"),
    OptimizerSpec("adamw", frozenset({"eps"}), (2, 2), "adamw"),
    OptimizerSpec("adam_atan2", frozenset({"max_angle", "atan2_a", "atan2_b"}), (2, 2), "adam-atan2"),
    OptimizerSpec("moclip_adam_eps", frozenset({"max_angle", "clip_mode", "eps"}), (2, 2), "moclip"),
    OptimizerSpec("mofo", frozenset({"eps", "mofo_fraction"}), (2, 2), "mofo"),
    # TAM keeps its smoothed cosine in every element of a second state (megatron's checkpointing saves
    # and reshards per-element states only).
    OptimizerSpec("tam", frozenset({"eps", "tam_gamma", "tam_variant"}), (2, 2), "tam"),
    OptimizerSpec("adamuon", frozenset({"eps", "muon_momentum"}), (2, 2), "adamuon", muon=True),
    OptimizerSpec("muonclip", frozenset({"muon_momentum", "attention_clip_grad"}), (1, 2), "muonclip", muon=True),
)}


def optimizer_spec(name: str) -> OptimizerSpec:
    """The registry entry of `name`, or a ValueError listing the known names."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]
