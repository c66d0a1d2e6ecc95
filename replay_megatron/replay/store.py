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
id, into a temporary shard directory renamed into place; `finalize_store` (rank 0, after every writer has
closed) writes the manifest atomically. Since a shard is sorted by sample id and the manifest holds no
timestamps, a resumed collection gives byte-identical files to an uninterrupted one.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
import torch

from replay_megatron.atomic_io import atomic_write_bytes, atomic_write_json, file_sha256
from replay_megatron.replay.selection import TopKSelection

FORMAT = "replay-megatron-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_META = "shard.json"
FINGERPRINT_KEYS = ("model", "tokenizer", "dataset")
# Names as in the config's `collect.store_logits`; numpy dtype on disk and torch dtype in memory.
LOGITS_DTYPES = {"fp16": (np.float16, torch.float16), "bf16": (np.uint16, torch.bfloat16),
                 "fp32": (np.float32, torch.float32)}
_INDEX = ("sample_ids", "record_offsets", "candidate_offsets")
_K_LIMIT = np.iinfo(np.int16).max - 1  # K_t and gold_index (<= k_max) are int16 on disk


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


def _columns(logits_dtype: str | None) -> dict[str, tuple[str, type]]:
    """Data columns of a shard: name -> (indexed per 'record' or per 'candidate', numpy dtype)."""
    columns = {"positions": ("record", np.int32), "k": ("record", np.int16), "gold_index": ("record", np.int16),
               "covered_mass": ("record", np.float32), "candidate_ids": ("candidate", np.int32)}
    if logits_dtype is not None:
        columns["candidate_logits"] = ("candidate", LOGITS_DTYPES[logits_dtype][0])
        columns["lse"] = ("record", np.float32)
    return columns


def _settings(k_max: int, logits_dtype: str | None) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "k_max": k_max, "logits_dtype": logits_dtype}


def _numpy(x) -> np.ndarray:
    """A tensor on any device, or an array-like, as a numpy array."""
    return x.detach().to("cpu").numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self._columns = _columns(logits_dtype)
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_ids: set[int] = set()
        self._recover()

    def _recover(self) -> None:
        """Drop what a crash left half-written; load the committed sample ids."""
        tmp_shard = self.shard_dir.with_name(f".{self.shard_dir.name}.tmp")
        if tmp_shard.exists():
            shutil.rmtree(tmp_shard)
        settings = _settings(self.k_max, self.logits_dtype)
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
        wanted = _settings(self.k_max, self.logits_dtype)
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
        candidates, k = _numpy(sel.candidates).astype(np.int64), _numpy(sel.k).astype(np.int64)
        positions, targets = _numpy(positions).astype(np.int64), _numpy(targets).astype(np.int64)
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
                   "covered_mass": _numpy(sel.covered_mass).astype(np.float32),
                   "candidate_ids": candidates[keep].astype(np.int32)}
        if self.logits_dtype is not None:
            if sel.candidate_logits is None or sel.lse is None:
                raise ValueError(f"{where}: the store keeps logits ({self.logits_dtype}); call dynamic_topk with "
                                 f"return_logits=True")
            logits = sel.candidate_logits.detach().to("cpu", LOGITS_DTYPES[self.logits_dtype][1])
            records["candidate_logits"] = logits.view(torch.int16).numpy().view(np.uint16)[keep] \
                if self.logits_dtype == "bf16" else logits.numpy()[keep]
            records["lse"] = _numpy(sel.lse).astype(np.float32)
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
        meta = {**_settings(self.k_max, self.logits_dtype), "rank": self.rank,
                "samples": len(arrays["sample_ids"]), "records": len(arrays["positions"]),
                "candidates": len(arrays["candidate_ids"])}
        atomic_write_json(tmp / SHARD_META, meta)
        _fsync_dir(tmp)
        os.replace(tmp, self.shard_dir)
        _fsync_dir(self.directory)
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
    _check_unique_ids(ids, directory)
    totals = {key: sum(s[key] for s in shards) for key in ("samples", "records", "candidates", "bytes")}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.loads(json.dumps(config)),
                "fingerprints": dict(fingerprints), "vocab_size": vocab_size, "k_max": settings["k_max"],
                "logits_dtype": settings["logits_dtype"], "totals": totals, "shards": shards}
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def _check_unique_ids(ids: list[np.ndarray], directory: Path) -> np.ndarray:
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
        order = _check_unique_ids(ids, directory)
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
        _check_manifest_agrees(directory, manifest)
        names = [*_INDEX, *_columns(manifest["logits_dtype"])]
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


def _check_manifest_agrees(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse a manifest that contradicts its shards' own records (shard.json, checksummed by it), e.g. one
    edited by hand: the readers size their arrays from the manifest's k_max."""
    def corrupt(where: str, key: str, manifest_value: Any, found: Any) -> ReplayStoreError:
        return ReplayStoreError(f"{directory / MANIFEST_NAME} is corrupt: its {key} is {manifest_value!r}, but "
                                f"{where} records {found!r}")

    recorded = manifest.get("config", {}).get("collect", {}).get("k_max", manifest["k_max"])
    if recorded != manifest["k_max"]:
        raise corrupt("its own config.collect", "k_max", manifest["k_max"], recorded)
    totals = {key: 0 for key in ("samples", "records", "candidates")}
    for shard in manifest["shards"]:
        path = directory / shard["name"] / SHARD_META
        meta = json.loads(path.read_text())
        for key in ("format_version", "k_max", "logits_dtype"):
            if meta.get(key) != manifest[key]:
                raise corrupt(str(path), key, manifest[key], meta.get(key))
        for key in totals:
            if meta.get(key) != shard[key]:
                raise corrupt(str(path), f"{shard['name']} {key}", shard[key], meta.get(key))
            totals[key] += shard[key]
    for key, value in totals.items():
        if manifest["totals"][key] != value:
            raise corrupt("the sum over its shards", f"totals.{key}", manifest["totals"][key], value)


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
