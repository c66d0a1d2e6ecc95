"""`preprocess`: SFT data (JSON Lines, JSON, Parquet; see formats.py) or plain text -> a token store.

Input formats: the record shapes of formats.py (`instruction`, `chat`, `alpaca`, `sharegpt`), each a
conversation encoded by the tokenizer's chat template with loss on the assistant turns (chat.py); and
`text`: one sample per non-blank line, encoded as `encode(line) + [eos]`, loss on every token that has a
previous token (SPEC.md section 1: for plain text every position with a next token is loss-bearing).

Length: a stored sample holds at most `seq_length + 1` tokens (a batch row: `seq_length` inputs and
labels). A longer sample is, by `truncation`, cut to its loss-bearing tail (the window of
`seq_length + 1` tokens ending at its last loss-bearing token: the prompt's head goes first) or dropped.
A sample left without a loss-bearing token is dropped. All three are counted in meta.json, per input
and in total. Every input is read and checked before the store is published (nothing is written on an
error); the store's padding fraction (row slots that hold no token when each sample fills one row of
`seq_length`) is recorded too.
"""
from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from replay_megatron.data.chat import ChatOptions
from replay_megatron.data.formats import SHAPES, DataError, count_records, read_records, text_lines
from replay_megatron.data.token_store import TokenDataset, TokenStoreWriter, is_token_store
from replay_megatron.data.tokenizer import Tokenizer, load_tokenizer

FORMATS = (*SHAPES, "text")
MODES = ("create", "append", "overwrite")
TRUNCATIONS = ("tail", "drop")
COUNTS = ("truncated", "dropped_too_long", "dropped_without_loss")

__all__ = ["DataError", "FORMATS", "MODES", "TRUNCATIONS", "fit_to_length", "preprocess"]


def fit_to_length(ids: list[int], mask: list[int], seq_length: int,
                  truncation: str) -> tuple[list[int], list[int], str | None]:
    """(ids, mask, what happened): None (kept as is), "truncated", "dropped_too_long" or
    "dropped_without_loss" (then ids and mask are empty)."""
    n, outcome = seq_length + 1, None
    if len(ids) > n:
        if truncation == "drop":
            return [], [], "dropped_too_long"
        loss = [j for j, m in enumerate(mask) if m]
        end = loss[-1] + 1 if loss else n
        start = max(0, end - n)
        ids, mask = ids[start:end], [0, *mask[start + 1:end]]  # the first token predicts nothing
        outcome = "truncated"
    if not any(mask):
        return [], [], "dropped_without_loss"
    return ids, mask, outcome


def encode_sample(tok: Tokenizer, kind: str, payload: Any, options: ChatOptions) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = this token is a target) of one record."""
    if kind == "chat":
        return tok.encode_chat(payload, options)
    ids = [*tok.encode(payload), tok.eos_id]
    return ids, [0] + [1] * (len(ids) - 1)


_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(tokenizer_path)


def _encode_in_worker(job: tuple[str, Any, ChatOptions]) -> tuple[list[int], list[int]]:
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


@dataclass
class _Source:
    """Counts for one input file."""

    path: Path
    first_id: int
    num_samples: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))


def _records(path: Path, fmt: str, mapping: dict[str, str] | None) -> Iterator[tuple[str, str, str, Any]]:
    """(where, string id, encoding kind, payload) per record of one input."""
    if fmt == "text":
        for where, sid, line in text_lines(path):
            yield where, sid, "text", line
    else:
        for r in read_records(path, fmt, mapping):
            yield r.where, r.sid, "chat", r.messages


def preprocess(inputs: str | Path | Sequence[str | Path], tokenizer_path: str | Path, out_dir: str | Path,
               seq_length: int, fmt: str = "instruction", workers: int = 1, mode: str = "create",
               progress: bool | None = None, mapping: dict[str, str] | None = None,
               chat: ChatOptions = ChatOptions(), truncation: str = "tail") -> dict[str, Any]:
    """Tokenize `inputs` (in order) into the token store `out_dir`; returns the store's meta (token_store.py).

    `mode`: "create" (refuse an existing store), "append" (add samples after the existing ones; the
    tokenizer and seq_length must match), "overwrite". `mapping` renames fields (formats.parse_map);
    `chat` says which turns are trained; `truncation`: "tail" or "drop" (module doc).
    `progress=None` shows a bar only on a terminal.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if seq_length < 1:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input file not found: {', '.join(missing)}")
    out = Path(out_dir)
    tok = load_tokenizer(tokenizer_path)
    writer = _open_writer(out, tok, str(tokenizer_path), seq_length, mode)
    old_meta = writer.base_meta
    seen = {sid: f"sample {i} of the store" for i, sid in enumerate(writer.string_ids)}
    sources: list[_Source] = []
    pending: list[tuple[str, _Source]] = []

    def jobs() -> Iterator[tuple[str, Any, ChatOptions]]:
        for path in paths:
            source = _Source(path, writer.num_samples)
            sources.append(source)
            empty = True
            for where, sid, kind, payload in _records(path, fmt, mapping):
                if sid in seen:
                    raise DataError(f"{where}: duplicate sample id {sid!r} (already {seen[sid]})")
                seen[sid], empty = f"at {where}", False
                pending.append((sid, source))
                yield kind, payload, chat
            if empty:
                raise DataError(f"{path}: no samples")

    pool = multiprocessing.Pool(workers, _init_worker, (str(tokenizer_path),)) if workers > 1 else None
    try:
        encoded = pool.imap(_encode_in_worker, jobs(), chunksize=64) if pool else \
            (encode_sample(tok, *job) for job in jobs())
        total = sum(count_records(p) or 0 for p in paths) or None
        with tqdm(encoded, total=total, desc=f"preprocess {paths[0].name}", unit="sample",
                  disable=None if progress is None else not progress) as bar:
            for k, (ids, mask) in enumerate(bar):
                sid, source = pending[k]
                ids, mask, outcome = fit_to_length(ids, mask, seq_length, truncation)
                if outcome is not None:
                    source.counts[outcome] += 1
                if ids:
                    writer.add(sid, ids, mask)
                    source.num_samples += 1
        if writer.num_samples == 0:
            raise DataError(f"{', '.join(map(str, paths))}: no samples left ({_summary(sources)})")
        return writer.close(_meta(tok, str(tokenizer_path), seq_length, fmt, mapping, chat, truncation,
                                  old_meta, sources, writer))
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()


def _summary(sources: list[_Source]) -> str:
    return ", ".join(f"{sum(s.counts[k] for s in sources)} {k.replace('_', ' ')}" for k in COUNTS)


def _meta(tok: Tokenizer, tokenizer_path: str, seq_length: int, fmt: str, mapping: dict[str, str] | None,
          chat: ChatOptions, truncation: str, old_meta: dict[str, Any], sources: list[_Source],
          writer: TokenStoreWriter) -> dict[str, Any]:
    n, positions = writer.num_samples, writer.num_tokens - writer.num_samples  # a sample of L tokens fills L - 1
    meta = {
        "tokenizer": {"kind": tok.kind, "path": tokenizer_path, "fingerprint": tok.fingerprint(),
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
        "seq_length": seq_length, "padding_fraction": 1.0 - positions / (n * seq_length),
        "sources": [*old_meta.get("sources", []), *(
            {"path": str(s.path), "sha256": _sha256_file(s.path), "format": fmt, "map": dict(mapping or {}),
             "chat": chat.as_dict(), "truncation": truncation, "first_sample_id": s.first_id,
             "num_samples": s.num_samples, **s.counts} for s in sources)],
    }
    meta.update({k: old_meta.get(k, 0) + sum(s.counts[k] for s in sources) for k in COUNTS})
    return meta
