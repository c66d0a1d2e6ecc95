"""Random instruction-shaped token stores: data for tests and for `tools/accelerator_check.py`, which
must run where no tokenizer or data set can be fetched."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from replay_megatron.data.token_store import TokenStoreWriter


def write_random_token_store(out: Path, n: int, seed: int, *, seq_length: int, vocab_size: int,
                             tokenizer_fingerprint: str = "test-tokenizer") -> None:
    """`n` samples of 8..seq_length+1 random ids below `vocab_size`, the loss on a tail of each (a response
    after a prompt), as `preprocess` would store them (token ids 0 and 1 double as pad and eos)."""
    rng = np.random.default_rng(seed)
    writer = TokenStoreWriter(out)
    for i in range(n):
        length = int(rng.integers(8, seq_length + 2))
        prompt = int(rng.integers(1, length - 2))
        writer.add(f"s{i}", rng.integers(0, vocab_size, length).tolist(), [0] * prompt + [1] * (length - prompt))
    writer.close({"tokenizer": {"kind": "test", "path": "-", "fingerprint": tokenizer_fingerprint,
                                "vocab_size": vocab_size, "eos_id": 1, "pad_id": 0}, "seq_length": seq_length})
