"""Qwen3 weights between Hugging Face names/layouts and a megatron-core GPTModel (local spec).

Layouts that differ between the two (SPEC.md notation):
- QKV: Megatron fuses q, k, v into `linear_qkv` with rows interleaved per query group
  ([q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...]); TP splits whole groups.
- MLP: `linear_fc1` stacks gate and up; under TP each rank holds [gate shard; up shard].
- Vocabulary: embedding/output rows padded to the TP multiple (zeros), removed again on export.
- Layers: Megatron numbers layers per pipeline stage; `layer_number` (1-based, global) maps them back.
Tied embeddings: the last stage's `output_layer.weight` is the embedding (Megatron keeps a copy there).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from replay_megatron.models.qwen3 import head_dim

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron (local spec) layer suffix -> HF layer suffix, for tensors that map one to one.
LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# Transformer Engine spec fuses the norms into the following linear layer.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


class ConversionError(ValueError):
    """Weights and config disagree (missing tensor, wrong shape); the message names the tensor."""


def attention_groups(hf: Mapping[str, Any]) -> tuple[int, int, int]:
    """(attention heads, key/value groups, head dim) of an HF config."""
    heads = hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads", heads)
    return heads, groups, head_dim(hf)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hf: Mapping[str, Any]) -> torch.Tensor:
    """HF q/k/v projections -> Megatron's per-group interleaved `linear_qkv` weight (full, TP=1)."""
    heads, groups, d = attention_groups(hf)
    hidden = q.shape[1]
    q = q.view(groups, heads // groups * d, hidden)
    return torch.cat([q, k.view(groups, d, hidden), v.view(groups, d, hidden)], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, hf: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    heads, groups, d = attention_groups(hf)
    hidden = qkv.shape[1]
    per_group = qkv.view(groups, (heads // groups + 2) * d, hidden)
    q, k, v = per_group.split([heads // groups * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def _tp_shard(full: torch.Tensor, param: torch.Tensor, tp: int, tp_rank: int, glu: bool) -> torch.Tensor:
    """This rank's slice of a full Megatron tensor, following the parameter's TP attributes."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if glu:  # [gate; up] -> this rank's [gate_r; up_r]
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[tp_rank], up.chunk(tp, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp, dim=dim)[tp_rank]


def full_megatron_tensor(name: str, layer_number: int | None, hf_sd: Mapping[str, torch.Tensor],
                         hf: Mapping[str, Any], padded_vocab: int) -> torch.Tensor:
    """The full (TP=1) Megatron tensor `name` built from the HF state dict. `layer_number` is 1-based global."""
    def get(key: str) -> torch.Tensor:
        if key not in hf_sd:
            raise ConversionError(f"HF checkpoint has no tensor {key!r} (needed for Megatron {name!r})")
        return hf_sd[key]

    if name == "embedding.word_embeddings.weight":
        return _pad_rows(get("model.embed_tokens.weight"), padded_vocab)
    if name == "output_layer.weight":
        key = "model.embed_tokens.weight" if hf.get("tie_word_embeddings") else "lm_head.weight"
        return _pad_rows(get(key), padded_vocab)
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    match = _LAYER.match(name)
    if not match or layer_number is None:
        raise ConversionError(f"no HF source for Megatron tensor {name!r}")
    suffix = TE_ALIASES.get(match.group(2), match.group(2))
    prefix = f"model.layers.{layer_number - 1}."
    if suffix in LAYER_DIRECT:
        return get(prefix + LAYER_DIRECT[suffix])
    if suffix == "self_attention.linear_qkv.weight":
        return fuse_qkv(*(get(prefix + f"self_attn.{p}_proj.weight") for p in "qkv"), hf)
    if suffix == "mlp.linear_fc1.weight":
        return torch.cat([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")])
    raise ConversionError(f"no HF source for Megatron tensor {name!r}")


def _layer_numbers(model: torch.nn.Module) -> dict[str, int]:
    """Local layer index (as in parameter names) -> global 1-based layer number."""
    return {str(i): layer.layer_number for i, layer in enumerate(model.decoder.layers)} if hasattr(
        model, "decoder") else {}


def _megatron_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters plus the tied output copy, keyed as in `model.state_dict()` (no `_extra_state`)."""
    tensors = dict(model.named_parameters())
    for name, tensor in model.state_dict().items():
        if not name.endswith("_extra_state") and name not in tensors:
            tensors[name] = tensor
    return tensors


@torch.no_grad()
def load_hf_into_model(model: torch.nn.Module, hf_sd: Mapping[str, torch.Tensor], hf: Mapping[str, Any],
                       *, tp: int, tp_rank: int) -> None:
    """Copy HF weights into this rank's stage/shard of a Qwen3 GPTModel (shapes checked)."""
    numbers = _layer_numbers(model)
    padded_vocab = model.vocab_size
    for name, target in _megatron_tensors(model).items():
        match = _LAYER.match(name)
        full = full_megatron_tensor(name, numbers.get(match.group(1)) if match else None, hf_sd, hf, padded_vocab)
        local = _tp_shard(full, target, tp, tp_rank, glu=name.endswith("mlp.linear_fc1.weight"))
        if local.shape != target.shape:
            raise ConversionError(f"shape mismatch for {name}: checkpoint gives {tuple(local.shape)}, "
                                  f"model expects {tuple(target.shape)} (TP={tp})")
        target.copy_(local)


@torch.no_grad()
def model_to_hf(model: torch.nn.Module, hf: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """HF state dict of a whole (TP=1, PP=1) Qwen3 GPTModel; vocabulary padding removed."""
    vocab = hf["vocab_size"]
    out: dict[str, torch.Tensor] = {}
    numbers = _layer_numbers(model)
    for name, tensor in _megatron_tensors(model).items():
        tensor = tensor.detach().clone()
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = tensor[:vocab]
        elif name == "output_layer.weight":
            if not hf.get("tie_word_embeddings"):
                out["lm_head.weight"] = tensor[:vocab]
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = tensor
        else:
            match = _LAYER.match(name)
            if not match:
                raise ConversionError(f"no HF name for Megatron tensor {name!r}")
            suffix = TE_ALIASES.get(match.group(2), match.group(2))
            prefix = f"model.layers.{numbers[match.group(1)] - 1}."
            if suffix in LAYER_DIRECT:
                out[prefix + LAYER_DIRECT[suffix]] = tensor
            elif suffix == "self_attention.linear_qkv.weight":
                for p, part in zip("qkv", split_qkv(tensor, hf)):
                    out[prefix + f"self_attn.{p}_proj.weight"] = part.contiguous()
            elif suffix == "mlp.linear_fc1.weight":
                gate, up = tensor.chunk(2)
                out[prefix + "mlp.gate_proj.weight"], out[prefix + "mlp.up_proj.weight"] = gate.clone(), up.clone()
            else:
                raise ConversionError(f"no HF name for Megatron tensor {name!r}")
    return out
