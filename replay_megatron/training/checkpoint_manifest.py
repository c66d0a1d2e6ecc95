"""Checksummed checkpoints: `checksums.json` (bytes and sha256 of every file) and the choice of what to resume.

Saving: right after the collective save each rank hashes the files it wrote (PyTorch DCP names rank R's
data `__R_N.distcp`; the shared files go to rank i mod world), reading them back from the page cache while
they are hot; rank 0 gathers the hashes, adds the files it writes last (train_state.json) and writes the
manifest before `checkpoints/latest` moves. Resuming: the ranks verify the checkpoint in the same split
(sizes, then sha256) before anything loads it; a damaged one is named and the previous verified checkpoint
is taken instead, saying so, and with none left the resume is refused. A missing or unreadable `latest` is
no fresh start while checkpoints are there: the newest verified one is resumed, saying so.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch.distributed as dist

from replay_megatron.atomic_io import atomic_write_json, atomic_write_text, file_sha256
from replay_megatron import run_dir as layout_of_run

FORMAT = "replay-megatron-checkpoint-checksums"
FORMAT_VERSION = 1
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")


class CheckpointCorrupt(RuntimeError):
    """No checkpoint of the run verifies; the message names each damaged file."""


def _files(directory: Path) -> list[str]:
    """Every regular file under `directory` but the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != layout_of_run.CHECKSUMS)


def _is_mine(relative: str, index: int, rank: int, world: int) -> bool:
    """Whether this rank hashes file number `index`: the rank that wrote a DCP data file, else index mod world."""
    match = _RANK_FILE.fullmatch(Path(relative).name)
    owner = int(match.group(1)) if match and int(match.group(1)) < world else index % world
    return owner == rank


def _entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _all_ranks(value: Any) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def hash_saved_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Checksums of every file in `directory`, each hashed by one rank (collective, after the save's barrier)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {rel: _entry(directory / rel) for i, rel in enumerate(_files(directory)) if _is_mine(rel, i, rank, world)}
    merged: dict[str, dict[str, Any]] = {}
    for part in _all_ranks(mine):
        merged.update(part)
    return merged


def write_manifest(directory: Path, hashed: dict[str, dict[str, Any]]) -> None:
    """`checksums.json` of `directory` from `hashed` plus the files written since (rank 0, last of the save)."""
    files = {rel: hashed.get(rel) or _entry(directory / rel) for rel in _files(directory)}
    atomic_write_json(directory / layout_of_run.CHECKSUMS,
                      {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files})


def _problems(directory: Path) -> list[str]:
    """What is wrong with checkpoint `directory` by its manifest (collective; the same list on every rank)."""
    path = directory / layout_of_run.CHECKSUMS
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"] if manifest.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, AttributeError) as e:
        return [f"{path} is missing or unreadable ({type(e).__name__}: {e})"]
    if not isinstance(files, dict):
        return [f"{path} is not a checkpoint checksum manifest"]
    rank, world = dist.get_rank(), dist.get_world_size()
    found = []
    for i, (rel, info) in enumerate(sorted(files.items())):
        if not _is_mine(rel, i, rank, world):
            continue
        file = directory / rel
        if not file.is_file():
            found.append(f"{file} is missing")
        elif file.stat().st_size != info["bytes"]:
            found.append(f"{file} is truncated or overwritten: {file.stat().st_size} bytes, the manifest records "
                         f"{info['bytes']}")
        elif file_sha256(file) != info["sha256"]:
            found.append(f"{file} is corrupt: its sha256 differs from {path.name}'s")
    return sorted(p for part in _all_ranks(found) for p in part)


def _candidates(run_dir: Path, say) -> list[Path]:
    """Checkpoints to try, best first: the one `latest` names, then older saved ones (all, newest first, when
    `latest` is missing or unreadable)."""
    saved = layout_of_run.saved_checkpoints(run_dir)
    try:
        named = layout_of_run.latest_pointer(run_dir)
    except ValueError as e:
        say(f"{e}; looking for the newest verified checkpoint instead")
        named = None
    else:
        if named is None and saved:
            say(f"{run_dir / layout_of_run.CHECKPOINTS / layout_of_run.LATEST} is missing but {len(saved)} "
                f"checkpoint(s) are there; looking for the newest verified one instead of starting over")
    if named is None:
        return saved[::-1]
    return [named, *(p for p in saved[::-1] if p.name < named.name)]


def _points_at(checkpoint: Path) -> bool:
    try:
        return layout_of_run.latest_pointer(checkpoint.parent.parent) == checkpoint
    except ValueError:
        return False


def _repoint_latest(checkpoint: Path, rank0: bool) -> None:
    """Point `latest` at the verified `checkpoint` (rank 0; a directory in the way is moved aside, not lost)."""
    if rank0:
        pointer = checkpoint.parent / layout_of_run.LATEST
        if pointer.is_dir() and not pointer.is_symlink():
            pointer.rename(pointer.with_name(f"{layout_of_run.LATEST}.unreadable"))
            print(f"[train] moved the directory {pointer} aside to {pointer.name}.unreadable", flush=True)
        atomic_write_text(pointer, checkpoint.name + "\n")
    dist.barrier()


def resume_checkpoint(run_dir: Path, *, announce: bool) -> Path | None:
    """The checkpoint to resume (collective), None for a fresh run (no `latest`, no saved checkpoint); raises
    CheckpointCorrupt naming the damage when none verifies. `announce`: print the fallbacks (rank 0)."""
    def say(message: str) -> None:
        if announce:
            print(f"[train] {message}", flush=True)

    candidates = _candidates(Path(run_dir), say)
    pointer_exists = os.path.lexists(Path(run_dir) / layout_of_run.CHECKPOINTS / layout_of_run.LATEST)
    if not candidates:
        if pointer_exists:
            raise CheckpointCorrupt(f"{run_dir}: checkpoints/latest is there but no checkpoint is; remove it to "
                                    "start the run over")
        return None
    damage: list[str] = []
    for checkpoint in candidates:
        pointed_at = _points_at(checkpoint)  # read by every rank before _problems' collective, so before any repoint
        problems = ([f"{checkpoint / layout_of_run.TRAIN_STATE} is missing (an unfinished save)"]
                    if not (checkpoint / layout_of_run.TRAIN_STATE).is_file() else _problems(checkpoint))
        if not problems:
            if damage:
                say(f"resuming from {checkpoint.name}, the newest checkpoint that verifies; the newer ones are "
                    "damaged (above) and are replaced as the run saves again")
            if not pointed_at:
                _repoint_latest(checkpoint, rank0=announce)
            return checkpoint
        damage += problems
        say(f"checkpoint {checkpoint.name} fails verification: {'; '.join(problems)}")
    raise CheckpointCorrupt(f"{run_dir}: no checkpoint verifies, refusing to resume or to start over:\n  "
                            + "\n  ".join(damage))
