"""Demo data generation (issue 7, item 1): determinism, splits, and answers checked by independent solvers."""
import json
import re
from pathlib import Path

import pytest

from replay_megatron.data.formats import exchange
from replay_megatron.data.tokenizer import SentencePieceTokenizer
from replay_megatron.evaluation.sql_execution import connect_readonly, run_sql
from replay_megatron.demo.generate import (
    DATABASES_DIR, SPLIT_FILES, DemoDataConfig, generate_demo_data, train_demo_tokenizer,
)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _load(d: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (d / SPLIT_FILES[split]).read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("demo")
    generate_demo_data(d, DemoDataConfig.quick(seed=3))
    return d


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(demo, tmp_path):
    generate_demo_data(tmp_path / "again", DemoDataConfig.quick(seed=3))
    generate_demo_data(tmp_path / "other", DemoDataConfig.quick(seed=4))
    same, other = _files(tmp_path / "again"), _files(tmp_path / "other")
    assert same == _files(demo)
    assert any(name.endswith(".sqlite") for name in same)
    for name in SPLIT_FILES.values():
        assert other[name] != same[name]


def test_second_call_reuses_and_changed_config_regenerates(tmp_path):
    cfg = DemoDataConfig.quick(seed=1)
    first = generate_demo_data(tmp_path, cfg)
    mtime = (tmp_path / "manifest.json").stat().st_mtime_ns
    assert generate_demo_data(tmp_path, cfg)["reused"] and not first["reused"]
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == mtime
    (tmp_path / SPLIT_FILES["domain_train"]).write_text("tampered\n")
    assert not generate_demo_data(tmp_path, cfg)["reused"]
    fewer = DemoDataConfig(**{**cfg.__dict__, "num_databases": 3})
    manifest = generate_demo_data(tmp_path, fewer)
    assert not manifest["reused"]
    assert len(list((tmp_path / DATABASES_DIR).glob("*.sqlite"))) == 3  # stale databases removed


def test_splits_have_requested_sizes_unique_ids_and_no_prompt_overlap(demo):
    cfg = DemoDataConfig.quick(seed=3)
    data = {s: _load(demo, s) for s in SPLIT_FILES}
    assert {s: len(rows) for s, rows in data.items()} == {
        "general_train": cfg.general_train, "general_heldout": cfg.general_heldout,
        "domain_train": cfg.domain_train, "domain_heldout": cfg.domain_heldout}
    ids = [r["id"] for rows in data.values() for r in rows]
    assert len(set(ids)) == len(ids)
    for part in ("general", "domain"):
        train = {r["prompt"] for r in data[f"{part}_train"]}
        assert not train & {r["prompt"] for r in data[f"{part}_heldout"]}
    assert {r["family"] for r in data["general_train"]} == {"arithmetic", "string", "lookup", "list"}
    for r in data["domain_train"] + data["domain_heldout"]:
        assert set(r) == {"id", "prompt", "response", "family", "db_id"} and r["family"] == "nl2sql"
        assert (demo / DATABASES_DIR / f"{r['db_id']}.sqlite").is_file()


def _solve_general(prompt: str) -> str | None:
    """Independent solvers for the general templates (None: template not covered here)."""
    if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    if m := re.fullmatch(r"Reverse the word (\w+)\.", prompt):
        return "".join(reversed(m[1]))
    if m := re.fullmatch(r"Sort these words: (.+)", prompt):
        return " ".join(sorted(m[1].split()))
    if m := re.fullmatch(r"How many times does the letter (\w) appear in (\w+)\?", prompt):
        return str(sum(c == m[1] for c in m[2]))
    if m := re.fullmatch(r"What is the (largest|smallest|sum) of ([\d, ]+)\?", prompt):
        xs = [int(x) for x in m[2].split(", ")]
        return str({"largest": max, "smallest": min, "sum": sum}[m[1]](xs))
    if m := re.fullmatch(r"Table: (.+) \. What is the (\w+) of (\w+)\?", prompt):
        header, *rows = [r.split(", ") for r in m[1].split(" ; ")]
        row = next(r for r in rows if r[0] == m[3])
        return row[header.index(m[2])]
    return None


def test_general_answers_match_independent_solvers(demo):
    rows = _load(demo, "general_train") + _load(demo, "general_heldout")
    solved = [(r, _solve_general(r["prompt"])) for r in rows]
    checked = [(r, answer) for r, answer in solved if answer is not None]
    assert len(checked) > 0.8 * len(rows)
    for r, answer in checked:
        assert r["response"] == answer, r


def test_gold_sql_returns_a_non_empty_result_on_its_database(demo):
    rows = _load(demo, "domain_train") + _load(demo, "domain_heldout")
    for r in rows:
        conn = connect_readonly(demo / DATABASES_DIR / f"{r['db_id']}.sqlite")
        result = run_sql(conn, r["response"])
        conn.close()
        assert result and any(v is not None for row in result for v in row), r
        # every table the question is about is in the prompt's schema
        table = re.search(r"FROM (\w+)", r["response"])[1]
        assert f" {table}(" in r["prompt"]


def test_tokenizer_training_is_deterministic_and_fits_demo_samples_in_128_tokens(demo, tmp_path):
    path = train_demo_tokenizer(demo, vocab_size=512)
    first = path.read_bytes()
    assert train_demo_tokenizer(demo, vocab_size=512).read_bytes() == first
    tok = SentencePieceTokenizer(path)
    assert 300 < tok.vocab_size <= 512
    rows = [r for s in SPLIT_FILES for r in _load(demo, s)]
    lengths = [len(tok.encode_chat(exchange(r["prompt"], r["response"]))[0]) for r in rows]
    assert max(lengths) <= 128


def test_make_demo_data_cli_writes_data_and_tokenizer(tmp_path, capsys):
    from replay_megatron.cli.main import main

    args = ["make-demo-data", "--out", str(tmp_path), "--general-train", "60", "--general-heldout", "10",
            "--domain-train", "30", "--domain-heldout", "10", "--num-databases", "3", "--vocab-size", "400"]
    assert main(args) == 0
    assert "generated (general_heldout 10, general_train 60, domain_heldout 10, domain_train 30)" in \
        capsys.readouterr().out
    assert SentencePieceTokenizer(tmp_path / "tokenizer.model").vocab_size <= 400
    assert main(args) == 0 and "reused" in capsys.readouterr().out
