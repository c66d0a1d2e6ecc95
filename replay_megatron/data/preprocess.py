"""`preprocess`: JSONL instruction data or plain text -> a token store (see token_store.py) with loss masks.

Input formats:
- `instruction`: JSON Lines, one object per line with string fields "prompt" and "response" and an
  optional "id" (string or integer; default "<file name>:<line>"). Extra fields are ignored. Loss mask:
  the response tokens and EOS (the tokenizer's template, see tokenizer.py).
- `text`: one sample per non-blank line, encoded as `encode(line) + [eos]`, loss on every token that has
  a previous token (SPEC.md section 1: for plain text every position with a next token is loss-bearing).

A sample longer than `seq_length + 1` tokens keeps its first `seq_length + 1` (a batch then holds
`seq_length` inputs and `seq_length` labels); the count is reported and stored in meta.json, as is the
number of samples left with no loss-bearing token.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from replay_megatron.data.token_store import TokenDataset, TokenStoreWriter, is_token_store
from replay_megatron.data.tokenizer import Tokenizer, load_tokenizer

FORMATS = ("instruction", "text")
MODES = ("create", "append", "overwrite")


class DataError(ValueError):
    """Bad input data or a refused operation; the message names the file (and line) and the problem."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON Lines file; DataError names file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def instruction_records(path: str | Path) -> Iterator[tuple[int, str, tuple[str, str]]]:
    """(line number, string id, (prompt, response)) per line of an instruction JSONL file."""
    path = Path(path)
    for lineno, obj in read_jsonl(path):
        for field in ("prompt", "response"):
            if field not in obj:
                raise DataError(f"{path}:{lineno}: missing field {field!r} (present: {', '.join(sorted(obj))})")
            if not isinstance(obj[field], str):
                raise DataError(f"{path}:{lineno}: field {field!r} must be a string, got {type(obj[field]).__name__}")
        sid = obj.get("id", f"{path.name}:{lineno}")
        if not isinstance(sid, (str, int)) or isinstance(sid, bool):
            raise DataError(f"{path}:{lineno}: field 'id' must be a string or an integer, got {type(sid).__name__}")
        yield lineno, str(sid), (obj["prompt"], obj["response"])


def text_records(path: str | Path) -> Iterator[tuple[int, str, str]]:
    """(line number, string id "<file name>:<line>", line) per non-blank line of a text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, f"{path.name}:{lineno}", line


def encode_sample(tok: Tokenizer, fmt: str, payload: Any) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = this token is a target) of one record."""
    if fmt == "instruction":
        return tok.encode_instruction(*payload)
    ids = [*tok.encode(payload), tok.eos_id]
    return ids, [0] + [1] * (len(ids) - 1)


_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(tokenizer_path)


def _encode_in_worker(job: tuple[str, Any]) -> tuple[list[int], list[int]]:
    assert _worker_tok is not None
    return encode_sample(_worker_tok, *job)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_writer(out: Path, tok: Tokenizer, tokenizer_path: str, seq_length: int, mode: str) -> TokenStoreWriter:
    """A writer for `mode`, after the checks that keep a store consistent (one tokenizer, one seq_length)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    exists = out.exists() and any(out.iterdir()) if out.is_dir() else out.exists()
    if exists and not is_token_store(out):
        raise DataError(f"{out} exists and is not a token store; refusing to replace it")
    if exists and mode == "create":
        raise DataError(f"{out} already holds a token store; use --append to add to it or --overwrite to replace it")
    if mode != "append" or not exists:
        return TokenStoreWriter(out)
    base = TokenDataset(out)
    if base.tokenizer_fingerprint != tok.fingerprint():
        raise DataError(f"cannot append to {out}: it was tokenized with {base.meta['tokenizer']['path']} "
                        f"(fingerprint {base.tokenizer_fingerprint[:16]}), but tokenizer {tokenizer_path} "
                        f"has fingerprint {tok.fingerprint()[:16]}")
    if base.seq_length != seq_length:
        raise DataError(f"cannot append to {out}: it has seq_length {base.seq_length}, not {seq_length}")
    return TokenStoreWriter(out, base=base)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


def preprocess(input_path: str | Path, tokenizer_path: str | Path, out_dir: str | Path, seq_length: int,
               fmt: str = "instruction", workers: int = 1, mode: str = "create",
               progress: bool | None = None) -> dict[str, Any]:
    """Tokenize `input_path` into the token store `out_dir`; returns the store's meta (see token_store.py).

    `mode`: "create" (refuse an existing store), "append" (add samples after the existing ones; the
    tokenizer and seq_length must match), "overwrite". `progress=None` shows a bar only on a terminal.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if seq_length < 1:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    input_path, out = Path(input_path), Path(out_dir)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file not found: {input_path}")
    tok = load_tokenizer(tokenizer_path)
    writer = _open_writer(out, tok, str(tokenizer_path), seq_length, mode)
    old_meta = writer.base_meta
    first_id = writer.num_samples
    seen = {sid: i for i, sid in enumerate(writer.string_ids)}
    truncated = without_loss = 0
    records = instruction_records(input_path) if fmt == "instruction" else text_records(input_path)
    pending: list[str] = []

    def jobs() -> Iterator[tuple[str, Any]]:
        for lineno, sid, payload in records:
            if sid in seen:
                raise DataError(f"{input_path}:{lineno}: duplicate sample id {sid!r} "
                                f"(already sample {seen[sid]} of the store)")
            seen[sid] = first_id + len(pending)
            pending.append(sid)
            yield fmt, payload

    pool = multiprocessing.Pool(workers, _init_worker, (str(tokenizer_path),)) if workers > 1 else None
    try:
        encoded = pool.imap(_encode_in_worker, jobs(), chunksize=64) if pool else \
            (encode_sample(tok, *job) for job in jobs())
        with tqdm(encoded, total=_count_lines(input_path), desc=f"preprocess {input_path.name}", unit="sample",
                  disable=None if progress is None else not progress) as bar:
            for k, (ids, mask) in enumerate(bar):
                if len(ids) > seq_length + 1:
                    ids, mask = ids[:seq_length + 1], mask[:seq_length + 1]
                    truncated += 1
                without_loss += not any(mask)
                writer.add(pending[k], ids, mask)
        if writer.num_samples == first_id:
            raise DataError(f"{input_path}: no samples")
        tokenizer_info = {"kind": tok.kind, "path": str(tokenizer_path), "fingerprint": tok.fingerprint(),
                          "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
        source = {"path": str(input_path), "sha256": _sha256_file(input_path), "format": fmt,
                  "first_sample_id": first_id, "num_samples": writer.num_samples - first_id,
                  "truncated": truncated, "samples_without_loss": without_loss}
        return writer.close({
            "tokenizer": tokenizer_info, "seq_length": seq_length,
            "truncated": old_meta.get("truncated", 0) + truncated,
            "samples_without_loss": old_meta.get("samples_without_loss", 0) + without_loss,
            "sources": [*old_meta.get("sources", []), source],
        })
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
