"""Writing a replay store (the format is described in `replay.store`): one writer per shard, committing
parts as it goes so a killed collection resumes, merged into the shard's columns at close; then
`finalize_store` writes the manifest with every file's size and sha256 once all shards are closed.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from replay_megatron.atomic_io import atomic_write_bytes, atomic_write_json
from replay_megatron.replay.selection import TopKSelection
from replay_megatron.replay.store import (FINGERPRINT_KEYS, FORMAT, FORMAT_VERSION, LOGITS_DTYPES, MANIFEST_NAME,
                                          SHARD_META, ReplayStoreError, as_numpy, check_unique_ids, file_sha256,
                                          fsync_dir, shard_name, store_columns, writer_settings)

_K_LIMIT = np.iinfo(np.int16).max - 1  # K_t and gold_index (<= k_max) are int16 on disk


class ReplayStoreWriter:
    """Writes one rank's shard: `add` finished samples, `close` when done; safe to kill and re-run.

    A re-created writer discards anything uncommitted, reports `committed_sample_ids` (the collect loop skips
    those) and continues. Samples are committed every `commit_every` samples and at `close`; a crash loses at
    most the uncommitted ones, which the re-run recomputes.
    """

    def __init__(self, directory: str | os.PathLike, rank: int, *, k_max: int, logits_dtype: str | None = None,
                 commit_every: int = 256) -> None:
        if logits_dtype is not None and logits_dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be None or one of {sorted(LOGITS_DTYPES)}, got {logits_dtype!r}")
        if not 1 <= k_max <= _K_LIMIT:
            raise ValueError(f"k_max must be in [1, {_K_LIMIT}] (K_t is int16 on disk), got {k_max}")
        if commit_every < 1:
            raise ValueError(f"commit_every must be >= 1, got {commit_every}")
        self.directory, self.rank, self.k_max, self.logits_dtype = Path(directory), rank, k_max, logits_dtype
        self.commit_every = commit_every
        self.shard_dir = self.directory / shard_name(rank)
        self.parts_dir = self.directory / f"parts-{rank:05d}"
        self._columns = store_columns(logits_dtype)
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_ids: set[int] = set()
        self._recover()

    def _recover(self) -> None:
        """Drop what a crash left half-written; load the committed sample ids."""
        tmp_shard = self.shard_dir.with_name(f".{self.shard_dir.name}.tmp")
        if tmp_shard.exists():
            shutil.rmtree(tmp_shard)
        settings = writer_settings(self.k_max, self.logits_dtype)
        if self.shard_dir.exists():  # this rank already closed; its parts (if any survive) are obsolete
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            self._check_settings(json.loads((self.shard_dir / SHARD_META).read_text()), self.shard_dir / SHARD_META)
            self.closed = True
            self._committed = {int(i) for i in np.load(self.shard_dir / "sample_ids.npy")}
            self._next_part = 0
            return
        self.closed = False
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.parts_dir.glob(".*.tmp"):  # a part whose atomic write never finished
            leftover.unlink()
        settings_path = self.parts_dir / "writer.json"
        if settings_path.exists():
            self._check_settings(json.loads(settings_path.read_text()), settings_path)
        else:
            atomic_write_json(settings_path, settings)
        self._committed = set()
        parts = self._parts()
        for part in parts:
            with np.load(part) as data:
                self._committed.update(int(i) for i in data["sample_ids"])
        self._next_part = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0

    def _check_settings(self, found: dict, path: Path) -> None:
        wanted = writer_settings(self.k_max, self.logits_dtype)
        found = {key: found.get(key) for key in wanted}
        if found != wanted:
            raise ReplayStoreError(f"{path} was written with {found}; this writer has {wanted}: use the same "
                                   f"settings to resume, or a new store directory")

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.npz"))

    @property
    def committed_sample_ids(self) -> frozenset[int]:
        """Sample ids already on disk for this rank (skip them when resuming)."""
        return frozenset(self._committed)

    def add(self, sample_id: int, positions: torch.Tensor, targets: torch.Tensor, selection: TopKSelection) -> None:
        """Queue the stored positions of one sample (positions ascending; `selection` from `dynamic_topk`)."""
        sample_id = int(sample_id)
        if self.closed:
            raise ReplayStoreError(f"{self.shard_dir} is already closed; sample {sample_id} cannot be added")
        if sample_id < 0 or sample_id in self._committed or sample_id in self._pending_ids:
            raise ValueError(f"sample id {sample_id} is negative or was already added to rank {self.rank}")
        self._pending.append(self._records(sample_id, positions, targets, selection))
        self._pending_ids.add(sample_id)
        if len(self._pending) >= self.commit_every:
            self.commit()

    def _records(self, sample_id: int, positions, targets, sel: TopKSelection) -> dict[str, np.ndarray]:
        candidates, k = as_numpy(sel.candidates).astype(np.int64), as_numpy(sel.k).astype(np.int64)
        positions, targets = as_numpy(positions).astype(np.int64), as_numpy(targets).astype(np.int64)
        n = positions.shape[0]
        where = f"sample {sample_id}"
        if candidates.shape != (n, self.k_max + 1) or k.shape != (n,) or targets.shape != (n,):
            raise ValueError(f"{where}: expected {n} positions with candidates [{n}, {self.k_max + 1}], k and "
                             f"targets [{n}]; got {candidates.shape}, {k.shape}, {targets.shape}")
        if n > 1 and np.any(np.diff(positions) <= 0):
            raise ValueError(f"{where}: positions must be strictly ascending")
        is_gold = (candidates == targets[:, None]) & (targets[:, None] >= 0)
        gold_index = is_gold.argmax(1)
        if not is_gold.any(1).all() or np.any(gold_index > k):
            raise ValueError(f"{where}: the gold token is missing from the candidates (not a dynamic_topk result?)")
        counts = k + (gold_index == k)
        keep = np.arange(self.k_max + 1)[None, :] < counts[:, None]
        records = {"sample_ids": np.array([sample_id], np.int64), "record_counts": np.array([n], np.int64),
                   "candidate_counts": np.array([counts.sum()], np.int64),
                   "positions": positions.astype(np.int32), "k": k.astype(np.int16),
                   "gold_index": gold_index.astype(np.int16),
                   "covered_mass": as_numpy(sel.covered_mass).astype(np.float32),
                   "candidate_ids": candidates[keep].astype(np.int32)}
        if self.logits_dtype is not None:
            if sel.candidate_logits is None or sel.lse is None:
                raise ValueError(f"{where}: the store keeps logits ({self.logits_dtype}); call dynamic_topk with "
                                 f"return_logits=True")
            logits = sel.candidate_logits.detach().to("cpu", LOGITS_DTYPES[self.logits_dtype][1])
            records["candidate_logits"] = logits.view(torch.int16).numpy().view(np.uint16)[keep] \
                if self.logits_dtype == "bf16" else logits.numpy()[keep]
            records["lse"] = as_numpy(sel.lse).astype(np.float32)
        return records

    def commit(self) -> None:
        """Write the queued samples as one part file, atomically."""
        if not self._pending:
            return
        names = ["sample_ids", "record_counts", "candidate_counts", *self._columns]
        buffer = io.BytesIO()
        np.savez(buffer, **{name: np.concatenate([s[name] for s in self._pending]) for name in names})
        atomic_write_bytes(self.parts_dir / f"part-{self._next_part:06d}.npz", buffer.getvalue())
        self._next_part += 1
        self._committed |= self._pending_ids
        self._pending, self._pending_ids = [], set()

    def close(self) -> None:
        """Commit, then merge this rank's parts into its shard (sorted by sample id) and remove the parts."""
        if self.closed:
            return
        self.commit()
        arrays = self._merge_parts()
        tmp = self.shard_dir.with_name(f".{self.shard_dir.name}.tmp")
        tmp.mkdir(parents=True)
        for name, array in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        meta = {**writer_settings(self.k_max, self.logits_dtype), "rank": self.rank,
                "samples": len(arrays["sample_ids"]), "records": len(arrays["positions"]),
                "candidates": len(arrays["candidate_ids"])}
        atomic_write_json(tmp / SHARD_META, meta)
        fsync_dir(tmp)
        os.replace(tmp, self.shard_dir)
        fsync_dir(self.directory)
        shutil.rmtree(self.parts_dir)
        self.closed = True

    def _merge_parts(self) -> dict[str, np.ndarray]:
        """All committed samples, ordered by sample id, as the shard's index and data columns."""
        parts = [np.load(p) for p in self._parts()]
        try:
            spans = []  # (sample id, part, record start, record end, candidate start, candidate end)
            for i, part in enumerate(parts):
                records = np.concatenate([[0], np.cumsum(part["record_counts"])])
                cands = np.concatenate([[0], np.cumsum(part["candidate_counts"])])
                spans += [(int(sid), i, records[j], records[j + 1], cands[j], cands[j + 1])
                          for j, sid in enumerate(part["sample_ids"])]
            spans.sort()
            record_counts = np.array([s[3] - s[2] for s in spans], np.int64)
            cand_counts = np.array([s[5] - s[4] for s in spans], np.int64)
            arrays = {"sample_ids": np.array([s[0] for s in spans], np.int64),
                      "record_offsets": np.concatenate([[0], np.cumsum(record_counts)]).astype(np.int64),
                      "candidate_offsets": np.concatenate([[0], np.cumsum(cand_counts)]).astype(np.int64)}
            for name, (level, dtype) in self._columns.items():
                data = [part[name] for part in parts]
                lo = 2 if level == "record" else 4
                pieces = [data[s[1]][s[lo]:s[lo + 1]] for s in spans]
                arrays[name] = np.concatenate(pieces).astype(dtype) if pieces else np.empty(0, dtype)
            return arrays
        finally:
            for part in parts:
                part.close()


def finalize_store(directory: str | os.PathLike, num_shards: int, *, config: Mapping[str, Any],
                   fingerprints: Mapping[str, str], vocab_size: int) -> dict[str, Any]:
    """Write `manifest.json` once all `num_shards` writers have closed (rank 0, after a barrier); returns it.

    `fingerprints` must name exactly model, tokenizer and dataset (see replay.fingerprint); `vocab_size` is
    the real vocabulary V (for storage as a fraction of full fp16 logits); `config` is recorded verbatim.
    """
    directory = Path(directory)
    if sorted(fingerprints) != sorted(FINGERPRINT_KEYS) or not all(isinstance(v, str) for v in fingerprints.values()):
        raise ValueError(f"fingerprints must map exactly {FINGERPRINT_KEYS} to strings, got {dict(fingerprints)}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    expected = {shard_name(r) for r in range(num_shards)}
    found = {p.name for p in directory.glob("shard-*") if p.is_dir()}
    if expected - found or found - expected:
        raise ReplayStoreError(f"{directory}: expected shards {sorted(expected)}, found {sorted(found)} (a rank "
                               f"that has not closed its writer, or shards from a run with another size)")
    shards, settings, ids = [], None, []
    for rank in range(num_shards):
        shard = directory / shard_name(rank)
        meta = json.loads((shard / SHARD_META).read_text())
        these = {key: meta[key] for key in ("format_version", "k_max", "logits_dtype")}
        if settings is not None and these != settings:
            raise ReplayStoreError(f"{shard} was written with {these}, {shard_name(0)} with {settings}")
        settings = these
        files = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(shard.iterdir())}
        shards.append({"name": shard.name, "samples": meta["samples"], "records": meta["records"],
                       "candidates": meta["candidates"], "bytes": sum(f["bytes"] for f in files.values()),
                       "files": files})
        ids.append(np.load(shard / "sample_ids.npy"))
    check_unique_ids(ids, directory)
    totals = {key: sum(s[key] for s in shards) for key in ("samples", "records", "candidates", "bytes")}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.loads(json.dumps(config)),
                "fingerprints": dict(fingerprints), "vocab_size": vocab_size, "k_max": settings["k_max"],
                "logits_dtype": settings["logits_dtype"], "totals": totals, "shards": shards}
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    return manifest
