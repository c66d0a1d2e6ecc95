"""From a token store to Megatron GPT micro-batches: the batch layout, the epoch order, the DP sharding.

Batch layout (Megatron's GPT convention). A stored sample `ids[0..L-1]` (L <= seq_length + 1) with its
stored mask `m` (m[j] = 1: token j is a target) fills the L - 1 columns [c, c + L - 1) of a row b of a
[b, s] batch (s = seq_length; c = 0 unless several samples share the row, see packing.py):

    tokens[b, c + t]    = ids[t]                 t < L - 1; pad_id in columns no sample fills
    labels[b, c + t]    = ids[t + 1]             the token position t must predict
    loss_mask[b, c + t] = m[t + 1]               1.0 iff that label is a loss-bearing target; 0 on padding
    position_ids[b, c + t] = t                   the position inside the sample
    segments[k]         = (sample id, b, c, L - 1)   one line per sample of the batch

so position t's label is the token at t + 1 and the loss mask at t refers to that label. Padding is on
the right of each row and continues the last sample's positions; with causal attention it cannot
influence real positions. A row holding several samples needs the block-diagonal causal mask
(models/qwen3.py) so that no sample attends to another.

Sample order and DP sharding. Training reads an endless stream of sample indices: epoch e is the
permutation `epoch_order(n, seed, e)`, epochs concatenated, so stream position p holds
`epoch_order(n, seed, p // n)[p % n]`. Optimizer step k consumes positions [k*G, (k+1)*G) (G = global
batch). Within a step, micro-batch m of DP rank r is positions `k*G + m*B*D + r*B + [0, B)` (B = micro
batch, D = DP size): the layout of Megatron's pretraining sampler. A run resumes from
`consumed_samples` (a multiple of B*D; after a full step a multiple of G) and reads exactly what the
uninterrupted run would have read; the order does not depend on D.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from replay_megatron.data.token_store import TokenDataset
from replay_megatron.platform.device import host_to_device


@dataclass
class GPTBatch:
    """One micro-batch in the layout above (all int64 except loss_mask, float32)."""

    tokens: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s]
    loss_mask: torch.Tensor  # [b, s]
    position_ids: torch.Tensor  # [b, s]
    segments: torch.Tensor  # [n, 4]: sample id, row, first column, real positions

    def to(self, device: torch.device | str) -> GPTBatch:
        """The batch on `device` (built on the host, it reaches an accelerator once, through pinned memory)."""
        return GPTBatch(*(host_to_device(getattr(self, f.name), device) for f in fields(self)))

    @property
    def sample_ids(self) -> torch.Tensor:
        """[n] the batch's sample ids, in row order."""
        return self.segments[:, 0]

    @property
    def packed(self) -> bool:
        """Whether some row holds several samples (known from shapes alone: no device sync)."""
        return self.segments.shape[0] != self.tokens.shape[0]


def make_batch(samples: Sequence[Mapping], seq_length: int, pad_id: int) -> GPTBatch:
    """Stack `samples` (TokenDataset items) into a right-padded [len(samples), seq_length] GPTBatch."""
    return make_rows_batch([[s] for s in samples], seq_length, pad_id)


def make_rows_batch(rows: Sequence[Sequence[Mapping]], seq_length: int, pad_id: int) -> GPTBatch:
    """A [len(rows), seq_length] GPTBatch whose row b holds the samples rows[b] one after the other."""
    b = len(rows)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.int64)
    labels = torch.full((b, seq_length), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((b, seq_length), dtype=torch.float32)
    position_ids = torch.arange(seq_length, dtype=torch.int64).repeat(b, 1)
    segments = []
    for row, samples in enumerate(rows):
        column = 0
        for s in samples:
            ids, mask = np.asarray(s["tokens"], dtype=np.int64), np.asarray(s["loss_mask"], dtype=np.float32)
            n = max(len(ids) - 1, 0)
            if column + n > seq_length:
                raise ValueError(f"sample {s['sample_id']} has {len(ids)} tokens, more than seq_length + 1 = "
                                 f"{seq_length + 1}; preprocess with --seq-length {seq_length}" if not column else
                                 f"sample {s['sample_id']} takes {n} positions, more than the {seq_length - column} "
                                 f"left in its row")
            tokens[row, column:column + n] = torch.from_numpy(ids[:n])
            labels[row, column:column + n] = torch.from_numpy(ids[1:])
            loss_mask[row, column:column + n] = torch.from_numpy(mask[1:])
            position_ids[row, column:] = torch.arange(seq_length - column)  # padding continues the last sample
            segments.append((int(s["sample_id"]), row, column, n))
            column += n
    return GPTBatch(tokens, labels, loss_mask, position_ids, torch.tensor(segments, dtype=torch.int64).view(-1, 4))


def real_positions(lengths: np.ndarray, seq_length: int) -> int:
    """Positions of seq_length-long rows that hold a token, for samples of these stored lengths (make_batch)."""
    return int(np.clip(np.asarray(lengths, dtype=np.int64) - 1, 0, seq_length).sum())


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(n) used in `epoch` (int64); a pure function of (n, seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def num_microbatches(global_batch: int, micro_batch: int, dp_size: int) -> int:
    """Micro-batches per rank per optimizer step; the global batch must split evenly."""
    if global_batch % (micro_batch * dp_size):
        raise ValueError(f"global batch {global_batch} is not divisible by micro batch {micro_batch} x "
                         f"data-parallel size {dp_size}")
    return global_batch // (micro_batch * dp_size)


def train_micro_batches(n: int, micro_batch: int, dp_size: int, dp_rank: int, seed: int,
                        consumed_samples: int = 0, shuffle: bool = True) -> Iterator[list[int]]:
    """Endless sample-index micro-batches of `dp_rank`, starting after `consumed_samples` (see module doc)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
    if n < 1:
        raise ValueError("the dataset is empty")
    stride = micro_batch * dp_size
    if consumed_samples % stride:
        raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of micro batch x DP = {stride}")
    cached: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
    start = consumed_samples
    while True:
        batch = []
        for p in range(start + dp_rank * micro_batch, start + (dp_rank + 1) * micro_batch):
            epoch = p // n
            if cached[0] != epoch:
                cached = (epoch, epoch_order(n, seed, epoch) if shuffle else np.arange(n, dtype=np.int64))
            batch.append(int(cached[1][p % n]))
        yield batch
        start += stride


def sequential_micro_batches(n: int, micro_batch: int, dp_size: int, dp_rank: int) -> Iterator[list[int]]:
    """One pass over range(n) in order (Stage 0 collection, evaluation), same rank layout as training;
    the last micro-batches may be short, and a rank may get one fewer than another."""
    for start in range(dp_rank * micro_batch, n, micro_batch * dp_size):
        yield list(range(start, min(start + micro_batch, n)))


def batch_of(dataset: TokenDataset, indices: Sequence[int], seq_length: int) -> GPTBatch:
    """The GPTBatch of samples `indices` of a token store, padded with its tokenizer's pad id (on the host)."""
    return make_batch([dataset[i] for i in indices], seq_length, dataset.pad_id)
