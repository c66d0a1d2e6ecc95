"""The replay store: what Stage 0 writes and Stage 1 replays (SPEC.md section 1, step 6).

On disk (format version 1), a directory holding:

    manifest.json            format, version, config, fingerprints {model, tokenizer, dataset}, vocab_size,
                             k_max, logits_dtype, totals, and per shard: counts, bytes and sha256 of each file
    shard-RRRRR/             one per writing rank R (the DP rank in `collect`), samples sorted by id:
      sample_ids.npy         int64 [S]   ascending
      record_offsets.npy     int64 [S+1] sample i owns records record_offsets[i]:record_offsets[i+1]
      candidate_offsets.npy  int64 [S+1] ... and candidates candidate_offsets[i]:candidate_offsets[i+1]
      positions.npy          int32 [R]   position t of each record (ascending within a sample)
      k.npy                  int16 [R]   K_t
      gold_index.npy         int16 [R]   index of the gold x_t among the record's candidates; == K_t when
                                         it was appended, so a record has K_t + (gold_index == K_t) candidates
      covered_mass.npy       float32 [R] sum of the K_t top probabilities
      candidate_ids.npy      int32 [C]   ragged candidates of all records, concatenated, no padding
      candidate_logits.npy   [C] fp16 | fp32 | bf16 (raw uint16 bits; numpy has no bfloat16)   (optional)
      lse.npy                float32 [R] full-vocabulary log-sum-exp                             (optional)
      shard.json             the shard's settings and counts

Every file is a plain .npy, so readers memory-map them; `ReplayStore.get` finds a sample by binary search
in the in-memory id index (O(log S)) and reads only that sample's slices. Writing is crash-safe: a writer
commits finished samples as part files (`parts-RRRRR/part-NNNNNN.npz`, each written atomically, each
listing its sample ids: the parts are the rank's progress record); `close` merges them, sorted by sample
id, into a temporary shard directory renamed into place (`replay.store_writer`); `finalize_store` (rank 0, after every writer has
closed) writes the manifest atomically. Since a shard is sorted by sample id and the manifest holds no
timestamps, a resumed collection gives byte-identical files to an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
import torch

FORMAT = "replay-megatron-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_META = "shard.json"
FINGERPRINT_KEYS = ("model", "tokenizer", "dataset")
# Names as in the config's `collect.store_logits`; numpy dtype on disk and torch dtype in memory.
LOGITS_DTYPES = {"fp16": (np.float16, torch.float16), "bf16": (np.uint16, torch.bfloat16),
                 "fp32": (np.float32, torch.float32)}
_INDEX = ("sample_ids", "record_offsets", "candidate_offsets")


class ReplayStoreError(RuntimeError):
    """A replay store is missing, corrupt, from another model/tokenizer/dataset, or misused."""


class ReplaySample(NamedTuple):
    """The stored positions of one sample, padded for the restricted cross entropy (SPEC.md section 2)."""

    positions: torch.Tensor  # [n] int64
    targets: torch.Tensor  # [n] int64 gold ids x_t
    candidates: torch.Tensor  # [n, k_max+1] int64, -1 padding (the layout of `dynamic_topk`)
    k: torch.Tensor  # [n] int64 K_t
    covered_mass: torch.Tensor  # [n] fp32
    candidate_logits: torch.Tensor | None  # [n, k_max+1] fp32 (from the stored dtype), -inf padding
    lse: torch.Tensor | None  # [n] fp32


def shard_name(rank: int) -> str:
    return f"shard-{rank:05d}"


def store_columns(logits_dtype: str | None) -> dict[str, tuple[str, type]]:
    """Data columns of a shard: name -> (indexed per 'record' or per 'candidate', numpy dtype)."""
    columns = {"positions": ("record", np.int32), "k": ("record", np.int16), "gold_index": ("record", np.int16),
               "covered_mass": ("record", np.float32), "candidate_ids": ("candidate", np.int32)}
    if logits_dtype is not None:
        columns["candidate_logits"] = ("candidate", LOGITS_DTYPES[logits_dtype][0])
        columns["lse"] = ("record", np.float32)
    return columns


def writer_settings(k_max: int, logits_dtype: str | None) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "k_max": k_max, "logits_dtype": logits_dtype}


def as_numpy(x) -> np.ndarray:
    """A tensor on any device, or an array-like, as a numpy array."""
    return x.detach().to("cpu").numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_unique_ids(ids: list[np.ndarray], directory: Path) -> np.ndarray:
    """Argsort of all shards' sample ids; refuses an id stored by two shards."""
    every = np.concatenate(ids) if ids else np.empty(0, np.int64)
    order = np.argsort(every, kind="stable")
    dup = np.nonzero(every[order][1:] == every[order][:-1])[0]
    if dup.size:
        raise ReplayStoreError(f"{directory}: sample id {int(every[order][dup[0]])} is stored by two shards")
    return order


class _Shard:
    """Memory maps of one shard's columns."""

    def __init__(self, path: Path, names: Iterable[str]) -> None:
        self.path = path
        self.columns: dict[str, np.ndarray] = {}
        for name in names:
            try:
                self.columns[name] = np.load(path / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ReplayStoreError(f"shard file {path / f'{name}.npy'} is unreadable: {e}") from None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]


class ReplayStore:
    """Read access to a finalized replay store; use `ReplayStore.open`."""

    def __init__(self, directory: Path, manifest: dict[str, Any], shards: list[_Shard]) -> None:
        self.directory, self.manifest, self._shards = directory, manifest, shards
        self.k_max: int = manifest["k_max"]
        self.vocab_size: int = manifest["vocab_size"]
        self.logits_dtype: str | None = manifest["logits_dtype"]
        ids = [s["sample_ids"] for s in shards]
        order = check_unique_ids(ids, directory)
        self._ids = np.concatenate(ids)[order] if ids else np.empty(0, np.int64)
        self._shard_of = np.repeat(np.arange(len(shards)), [len(i) for i in ids])[order]
        self._local = np.concatenate([np.arange(len(i)) for i in ids])[order] if ids else np.empty(0, np.int64)

    @classmethod
    def open(cls, directory: str | os.PathLike, expect: Mapping[str, str] | None = None,
             verify: bool = True) -> ReplayStore:
        """Open and validate a store; refuse it if a fingerprint in `expect` differs from the manifest.

        `verify` checks every shard file's sha256 against the manifest: it reads the whole store once (about
        1 s per GB). Sizes are always checked, so truncation is caught even with `verify=False`.
        """
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ReplayStoreError(f"{directory} is not a finished replay store: {MANIFEST_NAME} is missing (was "
                                   f"collection interrupted before finalize_store?)")
        try:
            manifest = json.loads(path.read_text())
        except ValueError as e:
            raise ReplayStoreError(f"{path} is not valid JSON: {e}") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ReplayStoreError(f"{path}: format {manifest.get('format')!r} version "
                                   f"{manifest.get('format_version')!r} is not supported (this replay-megatron "
                                   f"reads {FORMAT!r} version {FORMAT_VERSION})")
        for key, value in (expect or {}).items():
            if key not in FINGERPRINT_KEYS:
                raise ValueError(f"unknown fingerprint {key!r}; expected some of {FINGERPRINT_KEYS}")
            stored = manifest["fingerprints"].get(key)
            if stored != value:
                raise ReplayStoreError(f"replay store {directory} was collected with another {key}: fingerprint "
                                       f"'{key}' differs (store: {stored}, expected: {value})")
        for shard in manifest["shards"]:
            for name, info in shard["files"].items():
                _check_file(directory / shard["name"] / name, info, verify)
        names = [*_INDEX, *store_columns(manifest["logits_dtype"])]
        shards = [_Shard(directory / s["name"], names) for s in manifest["shards"]]
        return cls(directory, manifest, shards)

    def __reduce__(self):
        """Pickle as a re-open (no sha256 pass) rather than copying the memory-mapped columns (DataLoader
        workers started with spawn)."""
        return ReplayStore.open, (self.directory, None, False)

    def __len__(self) -> int:
        return len(self._ids)

    def sample_ids(self) -> np.ndarray:
        """All stored sample ids, ascending."""
        return self._ids.copy()

    def get(self, sample_id: int) -> ReplaySample:
        """The stored positions of `sample_id`; KeyError if the store does not hold it."""
        i = int(np.searchsorted(self._ids, sample_id))
        if i == len(self._ids) or self._ids[i] != sample_id:
            raise KeyError(f"sample id {sample_id} is not in replay store {self.directory}")
        shard, j = self._shards[self._shard_of[i]], self._local[i]
        r0, r1 = shard["record_offsets"][j:j + 2]
        c0, c1 = shard["candidate_offsets"][j:j + 2]
        k = np.array(shard["k"][r0:r1], np.int64)
        gold_index = np.array(shard["gold_index"][r0:r1], np.int64)
        slots = np.arange(self.k_max + 1)[None, :] < (k + (gold_index == k))[:, None]
        candidates = np.full(slots.shape, -1, np.int64)
        candidates[slots] = shard["candidate_ids"][c0:c1]
        logits = lse = None
        if self.logits_dtype is not None:
            stored = np.array(shard["candidate_logits"][c0:c1])
            values = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16) \
                if self.logits_dtype == "bf16" else torch.from_numpy(stored)
            logits = torch.full(slots.shape, float("-inf"), dtype=torch.float32)
            logits[torch.from_numpy(slots)] = values.float()
            lse = torch.from_numpy(np.array(shard["lse"][r0:r1], np.float32))
        return ReplaySample(
            positions=torch.from_numpy(np.array(shard["positions"][r0:r1], np.int64)),
            targets=torch.from_numpy(candidates[np.arange(len(k)), gold_index]),
            candidates=torch.from_numpy(candidates), k=torch.from_numpy(k),
            covered_mass=torch.from_numpy(np.array(shard["covered_mass"][r0:r1], np.float32)),
            candidate_logits=logits, lse=lse)

    def k_values(self) -> np.ndarray:
        """K_t of every stored position (candidate counts before the gold append), read from the shards'
        k columns without decoding any sample."""
        return np.concatenate([np.asarray(s["k"], np.int64) for s in self._shards] or [np.empty(0, np.int64)])

    def summary(self) -> dict[str, float | int]:
        """Positions stored, K_t statistics, gold-appended rate, mean covered mass, bytes per position and
        storage as a fraction of full fp16 logits (2*V bytes per position)."""
        k = self.k_values()
        gold = np.concatenate([np.asarray(s["gold_index"], np.int64) for s in self._shards] or [np.empty(0, np.int64)])
        mass = np.concatenate([np.asarray(s["covered_mass"]) for s in self._shards] or [np.empty(0, np.float32)])
        n = int(k.size)
        total_bytes = int(self.manifest["totals"]["bytes"])
        nan = float("nan")
        per_position = total_bytes / n if n else nan
        return {"samples": len(self), "positions": n,
                "k_median": float(np.median(k)) if n else nan, "k_mean": float(k.mean()) if n else nan,
                "k_p90": float(np.percentile(k, 90)) if n else nan,
                "gold_appended_rate": float((gold == k).mean()) if n else nan,
                "covered_mass_mean": float(mass.astype(np.float64).mean()) if n else nan,
                "bytes": total_bytes, "bytes_per_position": per_position,
                "fraction_of_fp16_logits": per_position / (2 * self.vocab_size)}


def _check_file(path: Path, info: Mapping[str, Any], verify: bool) -> None:
    """Refuse a shard file that is missing, has another size than the manifest says, or another sha256."""
    if not path.is_file():
        raise ReplayStoreError(f"shard file {path} is missing")
    size = path.stat().st_size
    if size != info["bytes"]:
        what = "truncated" if size < info["bytes"] else "larger than recorded"
        raise ReplayStoreError(f"shard file {path} is {what}: {size} bytes, the manifest records {info['bytes']}")
    if verify and file_sha256(path) != info["sha256"]:
        raise ReplayStoreError(f"shard file {path} is corrupted: its sha256 differs from the manifest's")
