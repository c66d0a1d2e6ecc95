"""Model and optimizer for training: the Qwen3 stage wrapped in megatron-core's DDP and optimizer stack."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from replay_megatron.models.qwen3 import build_model, transformer_config
from replay_megatron.platform.distributed import ParallelLayout


def build_ddp_model(hf: Mapping[str, Any], layout: ParallelLayout, *, params_dtype: str = "fp32",
                    distributed_optimizer: bool = False, vocab_divisible_by: int = 1):
    """This rank's Qwen3 stage in megatron-core DDP (fp32 grad buffers, per-token loss scaling)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    config = transformer_config(hf, tp=layout.tp, pp=layout.pp, params_dtype=params_dtype,
                                calculate_per_token_loss=True)
    config.finalize_model_grads_func = finalize_model_grads
    model = build_model(hf, config, pre_process=layout.is_first_stage, post_process=layout.is_last_stage,
                        vocab_divisible_by=vocab_divisible_by)
    model.to(layout.device.torch_device)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer)
    return DistributedDataParallel(config, ddp_config, model)


def build_adamw(model, *, lr: float, weight_decay: float = 0.0, clip_grad: float = 0.0,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, params_dtype: str = "fp32",
                distributed_optimizer: bool = False):
    """megatron-core's own AdamW stack (fp32, or bf16/fp16 with fp32 main params; optionally sharded)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0],
                             adam_beta2=betas[1], adam_eps=eps, clip_grad=clip_grad,
                             bf16=params_dtype == "bf16", fp16=params_dtype == "fp16",
                             params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[params_dtype],
                             use_distributed_optimizer=distributed_optimizer)
    return get_megatron_optimizer(config, [model])
