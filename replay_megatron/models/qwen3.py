"""Qwen3 as a megatron-core GPTModel, built from a Hugging Face Qwen3 `config.json` dict.

Qwen3 in Megatron terms: GQA (num_query_groups = num_key_value_heads) with explicit kv_channels = head_dim
(which need not equal hidden/heads), RMSNorm on q and k per head (qk_layernorm), SwiGLU MLP, no biases,
RoPE with theta from the config, RMSNorm eps, tied or untied output layer, vocabulary padded so every TP
rank owns an equal slice (SPEC.md notation: rows [tp_rank*V/TP, (tp_rank+1)*V/TP)).
"""
from __future__ import annotations

import importlib.util
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from replay_megatron import mcore_compat

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NotQwen3Error(ValueError):
    """The HF config does not describe a Qwen3 dense model (or one this converter supports)."""


def check_qwen3(hf: Mapping[str, Any], source: str = "config.json") -> None:
    """Refuse configs that are not dense Qwen3 (or use features the mapping does not cover)."""
    if hf.get("model_type") != "qwen3":
        raise NotQwen3Error(f"{source}: model_type={hf.get('model_type')!r}, expected 'qwen3'")
    if hf.get("attention_bias"):
        raise NotQwen3Error(f"{source}: attention_bias=true is not Qwen3's layout (no biases)")
    rope_type = (hf.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type not in ("default", None):
        raise NotQwen3Error(f"{source}: rope_scaling type {rope_type!r} is not supported (default RoPE only)")


def rope_theta(hf: Mapping[str, Any]) -> float:
    """RoPE base: `rope_theta` (transformers 4.x configs) or `rope_parameters.rope_theta` (5.x)."""
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    return float((hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def head_dim(hf: Mapping[str, Any]) -> int:
    """Per-head width: explicit `head_dim`, else hidden/heads."""
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 1) -> int:
    """Vocabulary padded to a multiple of `divisible_by * tp` (Megatron's rule), so TP shards are equal."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def check_tp_fits(hf: Mapping[str, Any], tp: int) -> None:
    """TP must divide the attention heads and the query groups (each rank owns whole KV groups)."""
    heads, groups = hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
    if heads % tp or groups % tp:
        raise ValueError(f"TP={tp} must divide num_attention_heads={heads} and num_key_value_heads={groups}")


def transformer_config(hf: Mapping[str, Any], *, tp: int = 1, pp: int = 1, params_dtype: str = "fp32",
                       sequence_parallel: bool = False, cpu_initialization: bool = True, **overrides: Any):
    """megatron-core TransformerConfig equivalent to the HF Qwen3 config `hf`."""
    from megatron.core.transformer import TransformerConfig

    check_qwen3(hf)
    check_tp_fits(hf, tp)
    if hf["num_hidden_layers"] % pp:
        raise ValueError(f"num_hidden_layers={hf['num_hidden_layers']} is not divisible by PP={pp}")
    dtype = DTYPES[params_dtype]
    kwargs: dict[str, Any] = dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        kv_channels=head_dim(hf), ffn_hidden_size=hf["intermediate_size"],
        normalization="RMSNorm", layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        qk_layernorm=True, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_softmax_in_fp32=True,  # HF Qwen3 takes the attention softmax in fp32
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=cpu_initialization,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def transformer_engine_usable() -> bool:
    """Transformer Engine is installed and a CUDA device is present (never on CPU or NPU)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def build_model(hf: Mapping[str, Any], config, *, pre_process: bool, post_process: bool,
                vocab_divisible_by: int = 1, use_te: bool | None = None):
    """The local stage of a Qwen3 GPTModel: the TE spec where Transformer Engine is usable (`use_te=None`
    decides), megatron-core's local spec otherwise (CPU, NPU)."""
    from megatron.core.models.gpt import GPTModel

    from replay_megatron.models.output_layer import enable_output_heads

    if use_te is None:
        use_te = transformer_engine_usable()
    spec = mcore_compat.te_layer_spec() if use_te else mcore_compat.local_layer_spec()
    model = GPTModel(
        config=config, transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(hf["vocab_size"], config.tensor_model_parallel_size, vocab_divisible_by),
        max_sequence_length=int(hf.get("max_position_embeddings", 4096)),
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        position_embedding_type="rope", rotary_base=rope_theta(hf), parallel_output=True,
    )
    enable_output_heads(model)  # Stage 1's restricted CE runs as the output layer's head
    return model


def build_stage(hf: Mapping[str, Any], layout, *, params_dtype: str = "fp32", vocab_divisible_by: int = 1,
                **config_overrides: Any) -> torch.nn.Module:
    """This rank's pipeline stage of the Qwen3 (TP/PP and stage position from `layout`, a
    `platform.distributed.ParallelLayout`) on its device, with random initial weights."""
    config = transformer_config(hf, tp=layout.tp, pp=layout.pp, params_dtype=params_dtype, **config_overrides)
    model = build_model(hf, config, pre_process=layout.is_first_stage, post_process=layout.is_last_stage,
                        vocab_divisible_by=vocab_divisible_by)
    dtype = DTYPES[params_dtype]
    for param in model.parameters():
        # The local spec's RMSNorm (torch.nn.RMSNorm) ignores params_dtype. Megatron-LM's Float16Module casts
        # every parameter; so must we: megatron's Float16Optimizer checkpoints bf16/fp16 parameters only, and
        # a bf16 activation meeting an fp32 norm weight leaves torch's fused RMSNorm.
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model.to(layout.device.torch_device)


def causal_attention_mask(seq_length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron's boolean attention mask ([1, 1, s, s], True = masked) for causal LM."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)[None, None]


def packed_attention_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal mask ([b, 1, s, s], True = masked) of rows holding several samples, each
    starting at position id 0 (data/dataset.py): a position sees only earlier positions of its own sample.

    The local spec applies it as given (its softmax is unfused); Transformer Engine's fused attention
    would take its own causal mask instead, so packing refuses that spec (`check_packing_supported`).
    """
    segment = (position_ids == 0).cumsum(dim=1)
    s = position_ids.shape[1]
    return causal_attention_mask(s, position_ids.device) | (segment[:, None, :, None] != segment[:, None, None, :])


def check_packing_supported() -> None:
    """Packed rows need the block-diagonal mask, which only the local spec applies."""
    if transformer_engine_usable():
        raise ValueError("data.packing=true needs megatron-core's local layer spec, but Transformer Engine is "
                         "installed and would be used: its fused attention ignores the block-diagonal mask "
                         "(megatron's packed-sequence parameters are not wired up yet)")
