"""The token store: tokenized samples with loss masks on disk, read back O(1) per sample via memory maps.

Directory layout (format `replay-megatron-token-store/1`):

    tokens.npy      int32 [num_tokens]       all samples' token ids, concatenated
    loss_mask.npy   uint8 [num_tokens]       1 where that token is a training target (see below)
    offsets.npy     int64 [num_samples + 1]  sample i is [offsets[i], offsets[i+1])
    string_ids.json list[str]                the input's own id of sample i (side table)
    meta.json       format, tokenizer {kind, path, fingerprint, vocab_size, eos_id, pad_id}, seq_length,
                    counts, sources [{path, sha256, format, first_sample_id, num_samples}], fingerprint

Sample ids are the integers 0..num_samples-1 (the sample's index in the input, continued across appended
inputs); everything downstream (Stage 0 position seeds, the replay store) keys on them.

Loss mask convention: `loss_mask[j] = 1` means token j is predicted with loss, i.e. it is the label of
position j-1 (so `loss_mask[0]` is always 0). `dataset.make_batch` shifts it into the label layout.

The dataset fingerprint is the sha256 over the three arrays (each hashed, then the digests hashed with the
format name). Writes are crash-safe: arrays go to a temporary sibling directory, meta.json last, and the
directory is then renamed into place; a reader never sees a half-written store.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from replay_megatron.atomic_io import atomic_write_json, atomic_write_text

FORMAT = "replay-megatron-token-store/1"
ARRAYS = {"tokens": np.int32, "loss_mask": np.uint8, "offsets": np.int64}
_CHUNK = 1 << 22  # elements per copy step when streaming arrays


def _combine(digests: dict[str, str]) -> str:
    return hashlib.sha256("|".join([FORMAT, *(f"{k}:{digests[k]}" for k in ARRAYS)]).encode()).hexdigest()


class TokenStoreWriter:
    """Streams samples into a new store at `out_dir`; `close(meta)` publishes it atomically.

    With `base` (an open `TokenDataset`), the new store starts with a copy of base's samples (append).
    Memory use is bounded: arrays are streamed to raw files and converted to .npy at the end.
    """

    def __init__(self, out_dir: str | Path, base: TokenDataset | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".tmp", dir=self.out_dir.parent))
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; the published store is an ordinary directory
        self._raw = {k: open(self.tmp / f"{k}.raw", "wb") for k in ARRAYS}
        self._hash = {k: hashlib.sha256() for k in ARRAYS}
        self._counts = {k: 0 for k in ARRAYS}
        self.string_ids: list[str] = []
        self.base_meta: dict[str, Any] = base.meta if base is not None else {}
        self.num_tokens = self.num_loss_tokens = 0
        self._put("offsets", np.zeros(1, np.int64))
        if base is not None:
            for name, arr in (("tokens", base.tokens), ("loss_mask", base.loss_masks)):
                for chunk in _chunks(arr):
                    self._put(name, chunk)
            self._put("offsets", base.offsets[1:])
            self.num_tokens, self.num_loss_tokens = base.num_tokens, int(base.meta["num_loss_tokens"])
            self.string_ids = list(base.string_ids)

    def _put(self, name: str, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=ARRAYS[name]).tobytes()
        self._raw[name].write(data)
        self._hash[name].update(data)
        self._counts[name] += len(values)

    @property
    def num_samples(self) -> int:
        return len(self.string_ids)

    def add(self, string_id: str, tokens: Sequence[int], loss_mask: Sequence[int]) -> int:
        """Append one sample; returns its sample id."""
        if len(tokens) != len(loss_mask):
            raise ValueError(f"sample {string_id!r}: {len(tokens)} tokens but {len(loss_mask)} mask entries")
        self._put("tokens", np.asarray(tokens))
        self._put("loss_mask", np.asarray(loss_mask))
        self.num_tokens += len(tokens)
        self.num_loss_tokens += int(np.count_nonzero(loss_mask))
        self._put("offsets", np.array([self.num_tokens]))
        self.string_ids.append(string_id)
        return self.num_samples - 1

    def close(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Write the .npy files and meta.json (`meta` plus format, counts, fingerprint), then move the store
        into place, replacing any store already at `out_dir`. Returns the full meta."""
        try:
            for name, dtype in ARRAYS.items():
                self._raw[name].close()
                raw_path = self.tmp / f"{name}.raw"
                out = np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dtype,
                                                shape=(self._counts[name],))
                with open(raw_path, "rb") as raw:
                    for start in range(0, len(out), _CHUNK):
                        out[start:start + _CHUNK] = np.fromfile(raw, dtype=dtype, count=_CHUNK)
                out.flush()
                del out
                os.unlink(raw_path)
            atomic_write_text(self.tmp / "string_ids.json", json.dumps(self.string_ids, ensure_ascii=False))
            full = {**meta, "format": FORMAT, "num_samples": self.num_samples, "num_tokens": self.num_tokens,
                    "num_loss_tokens": self.num_loss_tokens,
                    "fingerprint": _combine({k: h.hexdigest() for k, h in self._hash.items()})}
            atomic_write_json(self.tmp / "meta.json", full)
            _swap_into_place(self.tmp, self.out_dir)
            return full
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard everything written so far."""
        for f in self._raw.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _chunks(a: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(a), _CHUNK):
        yield a[start:start + _CHUNK]


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename directory `new` to `target`; an existing `target` is moved aside first and then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old)


def is_token_store(path: str | Path) -> bool:
    return (Path(path) / "meta.json").is_file()


class TokenDataset:
    """Read-only view of a token store. `ds[i]` -> {"sample_id", "tokens" (int32), "loss_mask" (uint8)},
    both memory-mapped views; O(1) per sample. Picklable (re-opens the files in the receiving process)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a token store (no meta.json): {self.path}")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        arrays = {}
        for name, dtype in ARRAYS.items():
            f = self.path / f"{name}.npy"
            if not f.is_file():
                raise FileNotFoundError(f"token store {self.path} is missing {f.name}")
            arrays[name] = np.load(f, mmap_mode="r")
            if arrays[name].dtype != dtype or arrays[name].ndim != 1:
                raise ValueError(f"{f}: expected 1-D {np.dtype(dtype)}, found {arrays[name].ndim}-D {arrays[name].dtype}")
        self.tokens, self.loss_masks, self.offsets = arrays["tokens"], arrays["loss_mask"], arrays["offsets"]
        n, t = self.meta["num_samples"], self.meta["num_tokens"]
        if len(self.offsets) != n + 1 or len(self.tokens) != t or len(self.loss_masks) != t or self.offsets[-1] != t:
            raise ValueError(f"token store {self.path} is inconsistent with its meta.json "
                             f"({n} samples, {t} tokens expected)")
        self._string_ids: list[str] | None = None

    def __reduce__(self):
        return (TokenDataset, (str(self.path),))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples in {self.path}")
        i = int(i) % n
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"sample_id": i, "tokens": self.tokens[lo:hi], "loss_mask": self.loss_masks[lo:hi]}

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def string_ids(self) -> list[str]:
        if self._string_ids is None:
            self._string_ids = json.loads((self.path / "string_ids.json").read_text())
        return self._string_ids

    @property
    def fingerprint(self) -> str:
        """sha256 identifying the stored arrays (as recorded at write time; `verify()` recomputes it)."""
        return self.meta["fingerprint"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id, which fills every row past its sample (0 when the tokenizer has none)."""
        return int(self.meta["tokenizer"].get("pad_id") or 0)

    @property
    def seq_length(self) -> int:
        return int(self.meta["seq_length"])

    def verify(self) -> None:
        """Recompute the fingerprint from the arrays; raises ValueError when the files were altered."""
        digests = {}
        for name, arr in (("tokens", self.tokens), ("loss_mask", self.loss_masks), ("offsets", self.offsets)):
            h = hashlib.sha256()
            for chunk in _chunks(arr):
                h.update(np.ascontiguousarray(chunk).tobytes())
            digests[name] = h.hexdigest()
        if _combine(digests) != self.fingerprint:
            raise ValueError(f"token store {self.path}: arrays do not match the fingerprint in meta.json")
