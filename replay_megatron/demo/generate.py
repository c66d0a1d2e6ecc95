"""Write the demo's data set (issue 7, item 1) and train its sentencepiece tokenizer (item 2).

Layout of `out_dir` (every file written atomically, `manifest.json` last):

    general_train.jsonl, general_heldout.jsonl   {"id", "prompt", "response", "family"}
    domain_train.jsonl,  domain_heldout.jsonl    {"id", "prompt", "response" (gold SQL), "family": "nl2sql", "db_id"}
    databases/<db_id>.sqlite                     one small SQLite file per database
    manifest.json                                format, config, sample counts, sha256 of every file
    tokenizer.model                              from `train_demo_tokenizer` (sentencepiece, byte fallback)

Everything is a function of `DemoDataConfig` (the seed included): the same config gives byte-identical
files. Prompts are unique within each part (general, domain), so no held-out prompt, and no
(database, question) pair, appears in training. A second call with the same config reuses the files.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from replay_megatron.atomic_io import atomic_write_json, atomic_write_text
from replay_megatron.demo import nl2sql
from replay_megatron.evaluation.sql_execution import DATABASES_DIR, connect_readonly, run_sql
from replay_megatron.demo.general_tasks import general_sample

FORMAT = "replay-megatron-demo-data/1"
SPLIT_FILES = {
    "general_train": "general_train.jsonl",
    "general_heldout": "general_heldout.jsonl",
    "domain_train": "domain_train.jsonl",
    "domain_heldout": "domain_heldout.jsonl",
}
TOKENIZER_FILE = "tokenizer.model"


@dataclass(frozen=True)
class DemoDataConfig:
    """Sizes of the demo data set; the defaults suit a 64-128 hidden, 2-4 layer model on CPU."""

    seed: int = 0
    general_train: int = 20_000
    general_heldout: int = 1_000
    domain_train: int = 3_000
    domain_heldout: int = 200
    num_databases: int = 60

    @classmethod
    def quick(cls, seed: int = 0) -> DemoDataConfig:
        """A few hundred samples: smoke runs (`demo --quick`) and tests."""
        return cls(seed=seed, general_train=400, general_heldout=40, domain_train=200, domain_heldout=40,
                   num_databases=8)


def _rng(seed: int, part: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and Python versions.
    return random.Random(f"replay-megatron-demo:{seed}:{part}")


def _distinct(draw: Callable[[], dict[str, Any]], count: int, what: str) -> list[dict[str, Any]]:
    """`count` samples from `draw` with pairwise different prompts (fails rather than loop forever)."""
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    budget = 20 * count + 1000
    while len(out) < count:
        if budget == 0:
            raise RuntimeError(f"could not draw {count} distinct {what} prompts; lower the sample count")
        budget -= 1
        sample = draw()
        if sample["prompt"] not in seen:
            seen.add(sample["prompt"])
            out.append(sample)
    return out


def _split(samples: list[dict[str, Any]], part: str, heldout: int) -> dict[str, list[dict[str, Any]]]:
    """Held-out = the first `heldout` draws (i.i.d., so a uniform sample); ids name part, split, index."""
    splits = {"heldout": samples[:heldout], "train": samples[heldout:]}
    return {f"{part}_{name}": [{"id": f"{part}-{name}-{i:06d}", **s} for i, s in enumerate(rows)]
            for name, rows in splits.items()}


def general_splits(cfg: DemoDataConfig) -> dict[str, list[dict[str, Any]]]:
    """The general corpus, split into general_train / general_heldout."""
    rng = _rng(cfg.seed, "general")

    def draw() -> dict[str, Any]:
        family, prompt, response = general_sample(rng)
        return {"prompt": prompt, "response": response, "family": family}

    return _split(_distinct(draw, cfg.general_train + cfg.general_heldout, "general"), "general",
                  cfg.general_heldout)


def _informative(rows: list[tuple]) -> bool:
    return any(v is not None for row in rows for v in row)


def domain_splits(cfg: DemoDataConfig, db_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Write the databases into `db_dir` and draw NL2SQL samples whose gold SQL returns a non-empty,
    non-NULL result on their database."""
    rng = _rng(cfg.seed, "domain")
    dbs = [nl2sql.make_database(rng, f"db{i:03d}") for i in range(cfg.num_databases)]
    for db in dbs:
        nl2sql.write_sqlite(db, db_dir / f"{db.db_id}.sqlite")
    conns = {db.db_id: connect_readonly(db_dir / f"{db.db_id}.sqlite") for db in dbs}

    def draw() -> dict[str, Any]:
        while True:
            db = rng.choice(dbs)
            question, sql = nl2sql.make_question(rng, db)
            if _informative(run_sql(conns[db.db_id], sql)):
                return {"prompt": nl2sql.prompt_text(db, question), "response": sql, "family": "nl2sql",
                        "db_id": db.db_id}

    try:
        return _split(_distinct(draw, cfg.domain_train + cfg.domain_heldout, "domain"), "domain",
                      cfg.domain_heldout)
    finally:
        for conn in conns.values():
            conn.close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _reusable(out_dir: Path, cfg: DemoDataConfig) -> dict[str, Any] | None:
    """The existing manifest if it was written for `cfg` and every file it lists is intact."""
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("config") != asdict(cfg):
        return None
    ok = all((out_dir / rel).is_file() and _sha256(out_dir / rel) == sha for rel, sha in manifest["files"].items())
    return manifest if ok else None


def generate_demo_data(out_dir: str | Path, cfg: DemoDataConfig = DemoDataConfig()) -> dict[str, Any]:
    """Write the demo data set for `cfg` into `out_dir` (reusing it when already there); returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (manifest := _reusable(out_dir, cfg)) is not None:
        return {**manifest, "reused": True}
    (out_dir / "manifest.json").unlink(missing_ok=True)
    tmp_db_dir = Path(tempfile.mkdtemp(prefix=f".{DATABASES_DIR}.", dir=out_dir))
    os.chmod(tmp_db_dir, 0o755)  # mkdtemp makes it private; the published directory is an ordinary one
    try:
        splits = {**general_splits(cfg), **domain_splits(cfg, tmp_db_dir)}
        db_dir = out_dir / DATABASES_DIR
        if db_dir.exists():
            shutil.rmtree(db_dir)
        os.replace(tmp_db_dir, db_dir)
    finally:
        if tmp_db_dir.exists():
            shutil.rmtree(tmp_db_dir)
    for split, name in SPLIT_FILES.items():
        atomic_write_text(out_dir / name, _jsonl(splits[split]))
    files = [out_dir / n for n in SPLIT_FILES.values()] + sorted(db_dir.glob("*.sqlite"))
    manifest = {
        "format": FORMAT,
        "config": asdict(cfg),
        "counts": {split: len(rows) for split, rows in splits.items()},
        "files": {p.relative_to(out_dir).as_posix(): _sha256(p) for p in files},
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return {**manifest, "reused": False}


def _training_texts(data_dir: Path) -> Iterator[str]:
    for split in ("general_train", "domain_train"):
        with open(data_dir / SPLIT_FILES[split], encoding="utf-8") as f:
            for line in f:
                sample = json.loads(line)
                yield sample["prompt"]
                yield sample["response"]


def train_demo_tokenizer(data_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Train the demo's sentencepiece model on the training splits of `data_dir`; returns its path."""
    from replay_megatron.data.tokenizer import train_sentencepiece

    data_dir = Path(data_dir)
    return train_sentencepiece(_training_texts(data_dir), data_dir / TOKENIZER_FILE, vocab_size=vocab_size)
