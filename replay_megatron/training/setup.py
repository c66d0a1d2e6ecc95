"""The model for training: this rank's Qwen3 stage wrapped in megatron-core's DDP (the optimizer around it:
`optim.megatron.build_optimizer`)."""
from __future__ import annotations

from typing import Any, Mapping

from replay_megatron.models.qwen3 import build_stage
from replay_megatron.platform.distributed import ParallelLayout


def build_ddp_model(hf: Mapping[str, Any], layout: ParallelLayout, *, params_dtype: str = "fp32",
                    distributed_optimizer: bool = False, vocab_divisible_by: int = 1):
    """This rank's Qwen3 stage in megatron-core DDP (fp32 grad buffers, per-token loss scaling)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    model = build_stage(hf, layout, params_dtype=params_dtype, vocab_divisible_by=vocab_divisible_by,
                        calculate_per_token_loss=True)
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer)
    return DistributedDataParallel(model.config, ddp_config, model)
