"""Sequence packing: several samples per `seq_length` row, so that a batch is mostly tokens, not padding.

With `data.packing: true` the unit of training and Stage 0 is a row ("pack") instead of a sample: the
samples are grouped once by best-fit decreasing on their lengths (a pure function of the token store's
lengths and seq_length), `train.global_batch_size` and `micro_batch_size` count rows, and epochs go over
rows. Every sample keeps its id and its positions inside it (dataset.py's `segments`), so the Stage 0
records and the Stage 1 join are the same with and without packing, and a replay store serves both.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from replay_megatron.config.errors import ConfigError, Problem
from replay_megatron.data.dataset import GPTBatch, make_rows_batch
from replay_megatron.data.token_store import TokenDataset


def pack_lengths(positions: np.ndarray, seq_length: int) -> list[list[int]]:
    """Groups of sample indices whose `positions` (columns each takes) sum to at most `seq_length`:
    best-fit decreasing (each sample, longest first, goes into the fullest row it fits), rows in the
    order they were opened, samples in a row by index."""
    order = np.argsort(-np.asarray(positions, dtype=np.int64), kind="stable")
    rows: list[list[int]] = []
    free: dict[int, list[int]] = {}  # free columns -> rows with exactly that many
    sizes: list[int] = []  # the keys of `free`, sorted
    for i in order.tolist():
        need = int(positions[i])
        if need > seq_length:
            raise ValueError(f"sample {i} takes {need} positions, more than seq_length {seq_length}")
        k = bisect.bisect_left(sizes, need)
        if k < len(sizes):
            room = sizes[k]
            row = free[room].pop()
            if not free[room]:
                del free[room], sizes[k]
        else:
            room, row = seq_length, len(rows)
            rows.append([])
        rows[row].append(i)
        left = room - need
        if left not in free:
            free[left] = []
            bisect.insort(sizes, left)
        free[left].append(row)
    return [sorted(r) for r in rows]


class RowSource:
    """The rows batches are made of: one sample each, or packs of samples (`packing`)."""

    def __init__(self, dataset: TokenDataset, seq_length: int, packing: bool):
        if packing:
            from replay_megatron.models.qwen3 import check_packing_supported

            check_packing_supported()
        self.dataset, self.seq_length = dataset, seq_length
        self.packs = pack_lengths(np.clip(dataset.lengths.astype(np.int64) - 1, 0, None), seq_length) \
            if packing else None

    def __len__(self) -> int:
        return len(self.dataset) if self.packs is None else len(self.packs)

    def sample_ids(self, rows: Sequence[int]) -> list[int]:
        """The samples held by `rows`."""
        return list(rows) if self.packs is None else [i for r in rows for i in self.packs[r]]

    def batch(self, rows: Sequence[int]) -> GPTBatch:
        """The GPTBatch of `rows` (host tensors, padded with the tokenizer's pad id)."""
        members = [[r] for r in rows] if self.packs is None else [self.packs[r] for r in rows]
        return make_rows_batch([[self.dataset[i] for i in m] for m in members], self.seq_length,
                               self.dataset.pad_id)


def row_source(cfg, dataset: TokenDataset) -> RowSource:
    """The RowSource of `cfg` (data.seq_length, data.packing); a layer spec that cannot pack is refused."""
    try:
        return RowSource(dataset, cfg.data.seq_length, cfg.data.packing)
    except ValueError as e:
        raise ConfigError.of([Problem("data.packing", str(e), True)]) from None
