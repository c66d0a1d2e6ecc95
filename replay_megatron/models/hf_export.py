"""A megatron-core Qwen3 checkpoint (any TP/PP) streamed into Hugging Face safetensors shards.

No model is built: each Megatron tensor (one layer of a layer-stacked one at a time) is read from the
checkpoint (`DistCheckpointReader`), mapped to its HF tensors (models/conversion.py's layouts: QKV split,
gate/up unstacked, vocabulary padding removed) and written (`safetensors_stream`). Peak host memory is
about the largest tensor, and the work does not depend on how many ranks wrote the checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from replay_megatron.models.conversion import LAYER_DIRECT, TE_ALIASES, ConversionError, attention_groups, split_qkv
from replay_megatron.models.dist_checkpoint_reader import DistCheckpointReader
from replay_megatron.models.safetensors_stream import DEFAULT_SHARD_BYTES, TensorSpec, write_sharded


@dataclass(frozen=True)
class _Source:
    """One read from the checkpoint and the HF tensors made of it."""

    key: str
    layer: int | None
    specs: tuple[TensorSpec, ...]
    split: Callable[[torch.Tensor], Sequence[torch.Tensor]]


def _layer_key(reader: DistCheckpointReader, suffix: str) -> str:
    """The stored key of a layer tensor: megatron saves some norms under the TE-fused names."""
    aliases = [suffix, *(te for te, local in TE_ALIASES.items() if local == suffix)]
    for name in aliases:
        if f"decoder.layers.{name}" in reader.tensors:
            return f"decoder.layers.{name}"
    raise ConversionError(f"{reader.root}: checkpoint has none of {', '.join('decoder.layers.' + a for a in aliases)}")


def export_plan(reader: DistCheckpointReader, hf: Mapping[str, Any]) -> list[_Source]:
    """Every HF tensor of the model, grouped by the checkpoint read that yields it, in writing order."""
    vocab, layers = hf["vocab_size"], hf["num_hidden_layers"]
    heads, groups, d = attention_groups(hf)

    def whole(key: str, name: str, rows: int | None = None) -> _Source:
        shape = reader.shape(key)
        shape = (rows, *shape[1:]) if rows is not None else shape
        return _Source(key, None, (TensorSpec(name, reader.dtype(key), shape),),
                       lambda t: [t[:rows]] if rows is not None else [t])

    plan = [whole("embedding.word_embeddings.weight", "model.embed_tokens.weight", vocab)]
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for suffix, hf_suffix in LAYER_DIRECT.items():
            key = _layer_key(reader, suffix)
            plan.append(_Source(key, i, (TensorSpec(prefix + hf_suffix, reader.dtype(key), reader.shape(key)[1:]),),
                                lambda t: [t]))
        key = _layer_key(reader, "self_attention.linear_qkv.weight")
        hidden, dtype = reader.shape(key)[-1], reader.dtype(key)
        plan.append(_Source(key, i, tuple(TensorSpec(f"{prefix}self_attn.{p}_proj.weight", dtype, (rows, hidden))
                                          for p, rows in zip("qkv", (heads * d, groups * d, groups * d))),
                            lambda t: [part.contiguous() for part in split_qkv(t, hf)]))
        key = _layer_key(reader, "mlp.linear_fc1.weight")
        ffn, hidden = reader.shape(key)[1] // 2, reader.shape(key)[2]
        plan.append(_Source(key, i, tuple(TensorSpec(f"{prefix}mlp.{p}_proj.weight", reader.dtype(key), (ffn, hidden))
                                          for p in ("gate", "up")), lambda t: t.chunk(2)))
    for key in [k for k in reader.tensors if k.startswith("decoder.layers.")]:
        if reader.shape(key)[0] != layers:
            raise ConversionError(f"{reader.root}: {key} holds {reader.shape(key)[0]} layers, the config "
                                  f"{layers} (num_hidden_layers)")
    plan.append(whole("decoder.final_layernorm.weight", "model.norm.weight"))
    if not hf.get("tie_word_embeddings"):
        plan.append(whole("output_layer.weight", "lm_head.weight", vocab))
    return plan


def _tensors(reader: DistCheckpointReader, plan: Sequence[_Source]) -> Iterator[tuple[str, torch.Tensor]]:
    for source in plan:
        parts = source.split(reader.read(source.key, source.layer))
        for spec, part in zip(source.specs, parts):
            yield spec.name, part
        del parts


def export_weights(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, hf: Mapping[str, Any], *,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> list[str]:
    """Write the checkpoint's weights as HF safetensors shards (and index) into `out_dir`; returns the files."""
    from tqdm import tqdm

    reader = DistCheckpointReader(mcore_dir)
    plan = export_plan(reader, hf)
    specs = [spec for source in plan for spec in source.specs]
    with tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="HF export",
              disable=not progress) as bar:
        return write_sharded(Path(out_dir), specs, _tensors(reader, plan), max_shard_bytes, bar)
