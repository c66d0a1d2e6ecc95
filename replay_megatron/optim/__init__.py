"""Optimizers: MoClip (SPEC.md section 3), the plain-optimizer baselines of SPEC.md section 4 (TAM,
MoFO; Adam-atan2 and "MoClip without atan2" are MoClip settings), their distributed statistics, and
the builder of megatron-core's optimizer wrappers around them (`build_optimizer`)."""
from typing import Any

from replay_megatron.optim.moclip import MoClip, MoClipStats
from replay_megatron.optim.mofo import MoFO
from replay_megatron.optim.stats import (GlobalSumsReducer, TensorParallelGather, TensorParallelSums,
                                         counts_toward_global_stats)
from replay_megatron.optim.tam import TAM

# megatron-core integration (optim.megatron), imported on first use: importing megatron takes seconds.
_MEGATRON_EXPORTS = ("build_optimizer", "load_optimizer_state", "moclip_optimizers")

__all__ = ["MoClip", "MoClipStats", "TAM", "MoFO", "GlobalSumsReducer", "TensorParallelSums",
           "TensorParallelGather", "counts_toward_global_stats", *_MEGATRON_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _MEGATRON_EXPORTS:
        from replay_megatron.optim import megatron

        return getattr(megatron, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
