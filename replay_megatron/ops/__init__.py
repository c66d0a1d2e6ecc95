"""Loss ops of replay-megatron (PyTorch references; Triton kernels live in `replay_megatron_kernels`)."""
from replay_megatron.ops.restricted_cross_entropy import (
    renormalized_teacher,
    restricted_ce_with_kl,
    restricted_cross_entropy,
    restricted_kl_divergence,
    validate_candidates,
)

__all__ = ["renormalized_teacher", "restricted_ce_with_kl", "restricted_cross_entropy", "restricted_kl_divergence",
           "validate_candidates"]
