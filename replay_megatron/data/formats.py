"""SFT input files (JSON Lines, JSON, Parquet) and their record shapes, normalised to chat conversations.

Shapes (`--format`), with the field names a `--map` entry `NAME=FIELD` can rename:
- `instruction`: `prompt`, `response` (strings), optional `system`.
- `chat`: `messages`, a list of {`role`, `content`} with roles system (first only), user, assistant.
- `alpaca`: `instruction`, optional `input` (appended to the instruction after a newline), `output`,
  optional `system` and `history` ([[user, assistant], ...] turns before this one).
- `sharegpt`: `conversations`, a list of {`from`, `value`}; `from` is human/user, gpt/assistant or
  system; optional top-level `system`.
Every shape takes an optional `id` (string or integer; default "<file name>:<line or row>"). Role
values are renamed with `role:ROLE=VALUE` (e.g. `role:assistant=bot`). Plain text files are read by
`text_lines`. Every error names the file, the line (JSON Lines, JSON) or row (Parquet), and the field.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAPES = ("instruction", "chat", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
FIELDS = {
    "instruction": ("prompt", "response", "system", "id"),
    "chat": ("messages", "role", "content", "id"),
    "alpaca": ("instruction", "input", "output", "system", "history", "id"),
    "sharegpt": ("conversations", "from", "value", "system", "id"),
}


class DataError(ValueError):
    """Bad input data or a refused operation; the message names the file (and line) and the problem."""


@dataclass(frozen=True)
class Record:
    """One sample: where it came from ("file:line" / "file: row N"), its string id, its conversation."""

    where: str
    sid: str
    messages: list[dict[str, str]]


def exchange(prompt: str, response: str) -> list[dict[str, str]]:
    """The conversation of one prompt and its response."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def parse_map(entries: Sequence[str], shape: str) -> dict[str, str]:
    """`["prompt=question", "role:assistant=bot"]` -> {name: field}; unknown names are refused."""
    known = set(FIELDS.get(shape, ())) | ({f"role:{r}" for r in ROLES} if shape in ("chat", "sharegpt") else set())
    out: dict[str, str] = {}
    for entry in entries:
        for item in filter(None, (s.strip() for s in entry.split(","))):
            name, sep, field = item.partition("=")
            if not sep or not name or not field:
                raise DataError(f"--map {item!r}: expected NAME=FIELD")
            if name not in known:
                raise DataError(f"--map {item!r}: format {shape!r} has no field {name!r} "
                                f"(it has: {', '.join(sorted(known))})")
            out[name] = field
    return out


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)") \
            from None


def _jsonl_objects(path: Path) -> Iterator[tuple[str, int, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} at column {e.colno}") from None


def _json_array_objects(path: Path, text: str) -> Iterator[tuple[str, int, Any]]:
    """Items of a top-level JSON array, each with the line it starts on."""
    decoder, i = json.JSONDecoder(), text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i < len(text) and text[i] == "]":
            return
        lineno = text.count("\n", 0, i) + 1
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
        yield f"{path}:{lineno}", lineno, obj


def _json_objects(path: Path) -> Iterator[tuple[str, int, Any]]:
    raw = path.read_bytes()
    if not raw.lstrip().startswith(b"["):  # a .json file holding JSON Lines
        yield from _jsonl_objects(path)
        return
    for n, line in enumerate(raw.split(b"\n"), 1):
        _utf8(line, f"{path}:{n}")
    text = raw.decode("utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
    yield from _json_array_objects(path, text)


def _parquet_objects(path: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'replay-megatron[parquet]')") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", row, obj


def read_objects(path: str | Path) -> Iterator[tuple[str, int, Any]]:
    """(where, line or row number, decoded object) for each record of a .parquet, .json or JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    reader = _parquet_objects if suffix == ".parquet" else _json_objects if suffix == ".json" else _jsonl_objects
    yield from reader(path)


def count_records(path: str | Path) -> int | None:
    """A cheap upper bound on the number of records (for a progress bar), or None."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return None
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


def text_lines(path: str | Path) -> Iterator[tuple[str, str, str]]:
    """(where, string id "<file name>:<line>", line) per non-blank line of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, f"{path}:{lineno}").rstrip("\r\n")
            if line.strip():
                yield f"{path}:{lineno}", f"{path.name}:{lineno}", line


_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list"}


class _Fields:
    """Field access for one record under a mapping; errors say where and which field."""

    def __init__(self, where: str, obj: Any, mapping: Mapping[str, str]):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        self.where, self.obj, self.mapping = where, obj, mapping

    def name(self, key: str) -> str:
        return self.mapping.get(key, key)

    def get(self, key: str, kind: type | tuple[type, ...], required: bool = True, default: Any = None) -> Any:
        field = self.name(key)
        value = self.obj.get(field)
        if value is None:
            if required:
                raise DataError(f"{self.where}: missing field {field!r} (present: {', '.join(sorted(self.obj))})")
            return default
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = " or ".join(_TYPE_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise DataError(f"{self.where}: field {field!r} must be {expected}, got {type(value).__name__}")
        return value

    def fail(self, path: str, problem: str) -> DataError:
        return DataError(f"{self.where}: field {path}: {problem}")


def _turns(f: _Fields, key: str, role_key: str, content_key: str, aliases: Mapping[str, str]) -> list[dict[str, str]]:
    items = f.get(key, list)
    messages = []
    for n, item in enumerate(items):
        at = f"{f.name(key)!r}[{n}]"
        if not isinstance(item, dict):
            raise f.fail(at, f"expected an object, got {type(item).__name__}")
        for k in (role_key, content_key):
            if not isinstance(item.get(f.name(k)), str):
                got = "missing" if f.name(k) not in item else f"a {type(item[f.name(k)]).__name__}"
                raise f.fail(f"{at}.{f.name(k)}", f"must be a string, is {got}")
        value = item[f.name(role_key)]
        if value not in aliases:
            raise f.fail(f"{at}.{f.name(role_key)}", f"unknown role {value!r} (known: {', '.join(sorted(aliases))}; "
                                                   f"rename one with --map role:assistant={value})")
        messages.append({"role": aliases[value], "content": item[f.name(content_key)]})
    return messages


def _role_aliases(defaults: Mapping[str, str], mapping: Mapping[str, str]) -> dict[str, str]:
    aliases = dict(defaults)
    for role in ROLES:
        if f"role:{role}" in mapping:
            aliases[mapping[f"role:{role}"]] = role
    return aliases


def _conversation(shape: str, f: _Fields, mapping: Mapping[str, str]) -> list[dict[str, str]]:
    if shape == "instruction":
        messages = exchange(f.get("prompt", str), f.get("response", str))
    elif shape == "chat":
        messages = _turns(f, "messages", "role", "content", _role_aliases({r: r for r in ROLES}, mapping))
    elif shape == "alpaca":
        history = f.get("history", list, required=False, default=[])
        messages = []
        for n, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise f.fail(f"{f.name('history')!r}[{n}]", "expected [user text, assistant text]")
            messages += exchange(*pair)
        query = f.get("instruction", str)
        extra = f.get("input", str, required=False, default="")
        messages += exchange(f"{query}\n{extra}" if extra else query, f.get("output", str))
    else:
        messages = _turns(f, "conversations", "from", "value", _role_aliases(SHAREGPT_ROLES, mapping))
    system = f.get("system", str, required=False) if shape != "chat" else None
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _check_order(f: _Fields, messages: list[dict[str, str]]) -> None:
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise DataError(f"{f.where}: a system message may only come first (message {roles.index('system', 1)})")
    body = roles[1:] if roles and roles[0] == "system" else roles
    if not body or body[0] != "user":
        raise DataError(f"{f.where}: the conversation must start with a user message (after an optional system one)")
    if "assistant" not in body:
        raise DataError(f"{f.where}: the conversation has no assistant message, so nothing to train on")


def read_records(path: str | Path, shape: str, mapping: Mapping[str, str] | None = None) -> Iterator[Record]:
    """The conversations of `path` in `shape` (see the module doc), checked record by record."""
    if shape not in SHAPES:
        raise ValueError(f"format must be one of {SHAPES}, got {shape!r}")
    mapping = mapping or {}
    path = Path(path)
    for where, number, obj in read_objects(path):
        f = _Fields(where, obj, mapping)
        messages = _conversation(shape, f, mapping)
        _check_order(f, messages)
        sid = f.get("id", (str, int), required=False, default=f"{path.name}:{number}")
        yield Record(where, str(sid), messages)
