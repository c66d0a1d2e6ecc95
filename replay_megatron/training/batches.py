"""The micro-batches of each optimizer step on this rank: token batches from the sampler (resuming at
`consumed_samples`; rows are samples or, with data.packing, packs of them), moved to the device, and for replay runs joined with the Stage 0 candidates on the
last pipeline stage (the join runs on the host copy, then the targets move once)."""
from __future__ import annotations

from typing import Any

from replay_megatron.data.dataset import num_microbatches, train_micro_batches
from replay_megatron.data.packing import RowSource
from replay_megatron.training.objectives import ReplayMicroBatch
from replay_megatron.training.replay_head import replay_targets


class TrainBatches:
    """`next_step()` -> this DP rank's micro-batches of the next global batch (GPTBatch, or
    ReplayMicroBatch when `store` is given: its targets are None off the last stage)."""

    def __init__(self, cfg, rows: RowSource, store: Any, layout, vocab_size: int, consumed_samples: int):
        t = cfg.train
        self.rows, self.store, self.layout, self.vocab_size = rows, store, layout, vocab_size
        self.with_teacher = t.kl_weight > 0
        self.per_step = num_microbatches(t.global_batch_size, t.micro_batch_size, layout.dp)
        self.samples = train_micro_batches(len(rows), t.micro_batch_size, layout.dp, layout.dp_rank,
                                           cfg.run.seed, consumed_samples=consumed_samples)

    def next_step(self) -> list:
        device = self.layout.device.torch_device
        host = [self.rows.batch(next(self.samples)) for _ in range(self.per_step)]
        if self.store is None:
            return [b.to(device) for b in host]
        return [ReplayMicroBatch(b.to(device), self._targets(b).to(device) if self.layout.is_last_stage else None)
                for b in host]

    def _targets(self, host_batch):
        return replay_targets(host_batch.segments, host_batch.labels, self.store.get, vocab_size=self.vocab_size,
                              with_teacher=self.with_teacher)
