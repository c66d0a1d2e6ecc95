"""Optimizers: MoClip (SPEC.md section 3), the plain-optimizer baselines of SPEC.md section 4 (TAM,
MoFO; Adam-atan2 and "MoClip without atan2" are MoClip settings), and their distributed statistics."""
from replay_megatron.optim.moclip import MoClip, MoClipStats
from replay_megatron.optim.mofo import MoFO
from replay_megatron.optim.stats import (GlobalSumsReducer, TensorParallelGather, TensorParallelSums,
                                         counts_toward_global_stats)
from replay_megatron.optim.tam import TAM

__all__ = ["MoClip", "MoClipStats", "TAM", "MoFO", "GlobalSumsReducer", "TensorParallelSums",
           "TensorParallelGather", "counts_toward_global_stats"]
