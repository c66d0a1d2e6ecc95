"""The one table of optimizers a config can name (`optimizer.name`), read by the config schema, `plan`'s
memory estimate and `train`.

Data only, importing nothing from the project, so the config layer can read it without pulling in torch
or megatron-core. `builder` is the name `optim.megatron.build_optimizer` takes (None: not carried by
megatron's optimizer stack yet, so `train` refuses it while `plan` still estimates it).
"""
from __future__ import annotations

from dataclasses import dataclass

# optimizer.* fields every optimizer reads: the schedule, decoupled weight decay, moments, grad-norm clip.
COMMON_FIELDS = frozenset({"name", "lr", "min_lr", "lr_schedule", "warmup_iters", "weight_decay", "betas",
                           "clip_grad"})


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: the optimizer.* fields it reads besides COMMON_FIELDS, its fp32 states per parameter
    on (2-D transformer matrices, everything else), and how `train` builds it."""

    name: str
    fields: frozenset[str]
    states: tuple[int, int]
    builder: str | None = None
    eps_divides: bool = False  # optimizer.eps is Adam's denominator epsilon (else MoClip keeps its atan2)

    @property
    def trains(self) -> bool:
        return self.builder is not None


OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (
    OptimizerSpec("moclip", frozenset({"max_angle", "atan2_a", "atan2_b", "clip_mode"}), (2, 2), "moclip"),
    OptimizerSpec("adamw", frozenset({"eps"}), (2, 2), "adamw", eps_divides=True),
    OptimizerSpec("adam_atan2", frozenset({"max_angle", "atan2_a", "atan2_b"}), (2, 2), "adam-atan2"),
    OptimizerSpec("moclip_adam_eps", frozenset({"max_angle", "clip_mode", "eps"}), (2, 2), "moclip",
                  eps_divides=True),
    OptimizerSpec("mofo", frozenset({"eps", "mofo_fraction"}), (2, 2)),
    OptimizerSpec("tam", frozenset({"eps", "tam_gamma", "tam_variant"}), (1, 1)),
    OptimizerSpec("adamuon", frozenset({"eps", "muon_momentum"}), (2, 2)),
    OptimizerSpec("muonclip", frozenset({"muon_momentum", "qk_clip_threshold"}), (1, 2)),
)}


def optimizer_spec(name: str) -> OptimizerSpec:
    """The registry entry of `name`, or a ValueError listing the known names."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def trainable_optimizers() -> list[str]:
    """The names `train` builds in megatron-core's optimizer stack."""
    return [name for name, spec in OPTIMIZERS.items() if spec.trains]
