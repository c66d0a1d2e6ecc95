"""Tensors of a megatron-core torch_dist checkpoint read one at a time, without a model or process group.

The checkpoint is PyTorch DCP: `.metadata` lists each tensor's global shape and the chunks the ranks saved
(with their offsets), each chunk a `torch.save` record inside a `.distcp` file. A request (a whole tensor,
or one layer of a layer-stacked `decoder.layers.*` tensor) loads only the chunks it overlaps, straight
from the file; a request one chunk covers exactly is that chunk, with no copy.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch


class _FileSlice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file as a seekable stream (torch.load reads into its
    storage through readinto, so a chunk is not held twice)."""

    def __init__(self, f, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        count = min(len(view), self._length - self._pos)
        self._f.seek(self._start + self._pos)
        done = self._f.readinto(view[:count]) if count else 0
        self._pos += done
        return done


class DistCheckpointReader:
    """The tensors of the DCP checkpoint in `directory` (names as megatron's sharded keys)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.root = Path(directory)
        if not (self.root / ".metadata").is_file():
            raise FileNotFoundError(f"{self.root / '.metadata'}: missing; {self.root} is not a torch_dist "
                                    f"(PyTorch DCP) checkpoint")
        self._meta = FileSystemReader(str(self.root)).read_metadata()
        self.tensors = {k: v for k, v in self._meta.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key).properties.dtype

    def _entry(self, key: str):
        if key not in self.tensors:
            raise KeyError(f"{self.root}: checkpoint has no tensor {key!r}")
        return self.tensors[key]

    def _load_chunk(self, key: str, chunk) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self._meta.storage_data[MetadataIndex(key, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{self.root}: tensor {key!r} is stored with transforms "
                             f"{info.transform_descriptors}, which this reader does not undo")
        with open(self.root / info.relative_path, "rb") as f:
            tensor = torch.load(_FileSlice(f, info.offset, info.length), map_location="cpu", weights_only=True)
        if tuple(tensor.shape) != tuple(chunk.sizes):
            raise ValueError(f"{self.root}: chunk of {key!r} at {tuple(chunk.offsets)} has shape "
                             f"{tuple(tensor.shape)}, metadata says {tuple(chunk.sizes)}")
        return tensor

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The tensor `key`, or with `index` its slice `[index]` along the first axis (one layer)."""
        entry = self._entry(key)
        lo = [0] * len(entry.size)
        hi = list(entry.size)
        if index is not None:
            if not 0 <= index < hi[0]:
                raise IndexError(f"{self.root}: {key!r} has {hi[0]} entries along axis 0, asked for {index}")
            lo[0], hi[0] = index, index + 1
        chunks = [c for c in entry.chunks
                  if all(o < h and o + s > l for o, s, l, h in zip(c.offsets, c.sizes, lo, hi))]
        if len(chunks) == 1 and list(chunks[0].offsets) == lo and [o + s for o, s in
                                                                  zip(chunks[0].offsets, chunks[0].sizes)] == hi:
            out = self._load_chunk(key, chunks[0])
        else:
            out = torch.empty([h - l for l, h in zip(lo, hi)], dtype=entry.properties.dtype)
            covered = 0
            for chunk in chunks:
                part = self._load_chunk(key, chunk)
                starts = [max(o, l) for o, l in zip(chunk.offsets, lo)]
                ends = [min(o + s, h) for o, s, h in zip(chunk.offsets, chunk.sizes, hi)]
                src = tuple(slice(a - o, b - o) for a, b, o in zip(starts, ends, chunk.offsets))
                dst = tuple(slice(a - l, b - l) for a, b, l in zip(starts, ends, lo))
                out[dst].copy_(part[src])
                covered += out[dst].numel()
                del part
            if covered != out.numel():
                raise ValueError(f"{self.root}: the chunks of {key!r} cover {covered} of {out.numel()} elements")
        return out[0] if index is not None else out
