"""Sharded safetensors written one tensor at a time, as Hugging Face lays them out.

Every tensor's name, dtype and shape is known before any data is read (`TensorSpec`), so each shard's
header is written first and the tensors follow as they arrive: only the tensor being written is in
memory. One shard is `model.safetensors`; more are `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json` naming each tensor's file (what `from_pretrained` reads). The format: an
8-byte little-endian header length, the JSON header (`dtype`, `shape`, `data_offsets` per tensor), the
raw bytes.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

import torch

from replay_megatron.atomic_io import atomic_write_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10 ** 9  # about what transformers' save_pretrained writes per shard
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name in the file, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """`specs` in order, cut into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """File names of `count` shards, as transformers names them."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(specs: Sequence[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        if spec.dtype not in _DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} has no safetensors code")
        header[spec.name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def _write_tensor(f: BinaryIO, spec: TensorSpec, tensor: torch.Tensor) -> None:
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(f"{spec.name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {spec.dtype} {spec.shape}")
    f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_sharded(out_dir: str | Path, specs: Sequence[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress=None) -> list[str]:
    """Write `tensors` (name, tensor), arriving in the order of `specs`, into shards under `out_dir`
    (plus the index when there are several); `progress.update(nbytes)` after each. Returns the files."""
    out_dir = Path(out_dir)
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    stream = iter(tensors)
    for name, shard in zip(names, shards):
        with open(out_dir / name, "wb") as f:
            f.write(_header(shard))
            for spec in shard:
                got, tensor = next(stream, (None, None))
                if got != spec.name:
                    raise ValueError(f"expected tensor {spec.name!r} next, got {got!r}")
                _write_tensor(f, spec, tensor)
                del tensor
                if progress is not None:
                    progress.update(spec.nbytes)
    if next(stream, None) is not None:
        raise ValueError("more tensors than planned")
    if len(shards) > 1:
        atomic_write_json(out_dir / INDEX_FILE, {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {spec.name: name for name, shard in zip(names, shards) for spec in shard}})
        names.append(INDEX_FILE)
    return names
