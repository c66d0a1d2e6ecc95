"""`preprocess` and the token store: round trip against the tokenizer, truncation, append, CLI, errors."""
import json
import pickle
import re

import numpy as np
import pytest

from replay_megatron.cli.main import main
from replay_megatron.data.formats import exchange
from replay_megatron.data.preprocess import DataError, fit_to_length, preprocess
from replay_megatron.data.token_store import TokenDataset
from replay_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from replay_megatron.demo.generate import SPLIT_FILES, DemoDataConfig, generate_demo_data, train_demo_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    generate_demo_data(d, DemoDataConfig.quick())
    return d, train_demo_tokenizer(d, vocab_size=512)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected(tok, rows, seq_length):
    """Reference: each row encoded by the tokenizer directly, cut to seq_length + 1."""
    out = []
    for r in rows:
        ids, mask = tok.encode_chat(exchange(r["prompt"], r["response"]))
        out.append((ids[:seq_length + 1], mask[:seq_length + 1]))
    return out


def test_store_round_trips_the_tokenizer_output(demo, tmp_path):
    d, tok_path = demo
    src = d / SPLIT_FILES["domain_train"]
    meta = preprocess(src, tok_path, tmp_path / "s", seq_length=128, progress=False)
    ds, tok = TokenDataset(tmp_path / "s"), SentencePieceTokenizer(tok_path)
    rows = _rows(src)
    expected = _expected(tok, rows, 128)
    assert len(ds) == len(rows) == meta["num_samples"]
    for i in (0, 1, len(ds) - 1, -1):
        item = ds[i]
        assert item["sample_id"] == i % len(ds)
        assert isinstance(item["tokens"], np.memmap) and item["tokens"].dtype == np.int32
        assert item["loss_mask"].dtype == np.uint8
        assert item["tokens"].tolist() == expected[i][0] and item["loss_mask"].tolist() == expected[i][1]
    assert ds.string_ids == [r["id"] for r in rows]
    assert ds.tokenizer_fingerprint == tok.fingerprint() and ds.vocab_size == tok.vocab_size
    assert meta["num_tokens"] == sum(len(e[0]) for e in expected)
    assert meta["num_loss_tokens"] == sum(sum(e[1]) for e in expected)
    assert meta["truncated"] == 0 and meta["sources"][0]["format"] == "instruction"
    ds.verify()
    with pytest.raises(IndexError, match="sample 200 out of range for 200"):
        ds[200]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary directory left behind


def _fitted(ids, mask, n, truncation):
    """Reference: the window of n tokens ending at the last loss-bearing token, or nothing."""
    if len(ids) > n:
        if truncation == "drop":
            return None
        end = max(j for j, m in enumerate(mask) if m) + 1 if any(mask) else n
        ids, mask = ids[max(0, end - n):end], [0, *mask[max(0, end - n) + 1:end]]
    return (ids, mask) if any(mask) else None


@pytest.mark.parametrize("truncation", ["tail", "drop"])
def test_long_samples_keep_their_loss_bearing_tail_or_are_dropped_and_counted(demo, tmp_path, truncation):
    d, tok_path = demo
    src = d / SPLIT_FILES["general_train"]
    meta = preprocess(src, tok_path, tmp_path / "s", seq_length=20, truncation=truncation, progress=False)
    rows = _rows(src)
    encoded = _expected(SentencePieceTokenizer(tok_path), rows, 10**9)
    expected = [(r["id"], _fitted(ids, mask, 21, truncation)) for r, (ids, mask) in zip(rows, encoded)]
    n_long = sum(len(ids) > 21 for ids, _ in encoded)
    assert 0 < n_long < len(encoded)
    key = "truncated" if truncation == "tail" else "dropped_too_long"
    assert meta[key] == meta["sources"][0][key] == n_long
    kept = [(sid, e) for sid, e in expected if e is not None]
    assert meta["dropped_without_loss"] == len(expected) - len(kept) - (n_long if truncation == "drop" else 0) == 0
    ds = TokenDataset(tmp_path / "s")
    assert ds.string_ids == [sid for sid, _ in kept] and ds.lengths.max() == 21
    for i, (_, (ids, mask)) in enumerate(kept):
        assert ds[i]["tokens"].tolist() == ids and ds[i]["loss_mask"].tolist() == mask
    lengths = [min(len(ids) - 1, 20) for _, (ids, _) in kept]
    assert meta["padding_fraction"] == pytest.approx(1 - sum(lengths) / (20 * len(kept)))


def test_fit_to_length_cases():
    ids, mask = list(range(10)), [0, 0, 0, 0, 1, 1, 0, 0, 1, 0]
    assert fit_to_length(ids, mask, 9, "tail") == (ids, mask, None)
    assert fit_to_length(ids, mask, 5, "tail") == ([3, 4, 5, 6, 7, 8], [0, 1, 1, 0, 0, 1], "truncated")
    assert fit_to_length(ids, mask, 1, "tail") == ([7, 8], [0, 1], "truncated")
    assert fit_to_length(ids, mask, 5, "drop") == ([], [], "dropped_too_long")
    assert fit_to_length(ids, [0] * 10, 9, "tail") == ([], [], "dropped_without_loss")
    assert fit_to_length(ids, [0] * 10, 3, "tail") == ([], [], "dropped_without_loss")


def test_text_format_marks_every_token_with_a_previous_token(demo, tmp_path):
    _, tok_path = demo
    src = tmp_path / "corpus.txt"
    src.write_text("hello world\n\n  \nWhat is 3 + 4?\n")
    preprocess(src, tok_path, tmp_path / "s", seq_length=64, fmt="text", progress=False)
    ds, tok = TokenDataset(tmp_path / "s"), SentencePieceTokenizer(tok_path)
    assert ds.string_ids == ["corpus.txt:1", "corpus.txt:4"]
    for i, line in enumerate(["hello world", "What is 3 + 4?"]):
        ids = tok.encode(line) + [tok.eos_id]
        assert ds[i]["tokens"].tolist() == ids
        assert ds[i]["loss_mask"].tolist() == [0] + [1] * (len(ids) - 1)


def test_append_equals_preprocessing_the_concatenation(demo, tmp_path):
    d, tok_path = demo
    a, b = d / SPLIT_FILES["domain_train"], d / SPLIT_FILES["domain_heldout"]
    both = tmp_path / "both.jsonl"
    both.write_text(a.read_text() + b.read_text())
    whole = preprocess(both, tok_path, tmp_path / "whole", seq_length=64, progress=False)
    preprocess(a, tok_path, tmp_path / "parts", seq_length=64, progress=False)
    parts = preprocess(b, tok_path, tmp_path / "parts", seq_length=64, mode="append", progress=False)
    assert parts["fingerprint"] == whole["fingerprint"]
    assert parts["num_samples"] == whole["num_samples"] and parts["num_tokens"] == whole["num_tokens"]
    assert [s["first_sample_id"] for s in parts["sources"]] == [0, len(_rows(a))]
    assert TokenDataset(tmp_path / "parts").string_ids == TokenDataset(tmp_path / "whole").string_ids
    with pytest.raises(DataError, match=":1: duplicate sample id 'domain-heldout-000000' \\(already sample 200 "):
        preprocess(b, tok_path, tmp_path / "parts", seq_length=64, mode="append", progress=False)


def test_append_refuses_another_tokenizer_or_seq_length(demo, tmp_path):
    d, tok_path = demo
    src = d / SPLIT_FILES["domain_heldout"]
    preprocess(src, tok_path, tmp_path / "s", seq_length=64, progress=False)
    other_tok = train_sentencepiece([r["prompt"] for r in _rows(src)], tmp_path / "other.model", vocab_size=400)
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    fp = TokenDataset(tmp_path / "s").tokenizer_fingerprint
    with pytest.raises(DataError, match=f"cannot append to .*{fp[:16]}.*other.model"):
        preprocess(extra, other_tok, tmp_path / "s", seq_length=64, mode="append", progress=False)
    with pytest.raises(DataError, match="seq_length 64, not 32"):
        preprocess(extra, tok_path, tmp_path / "s", seq_length=32, mode="append", progress=False)
    assert TokenDataset(tmp_path / "s").meta["num_samples"] == len(_rows(src))  # untouched


def test_workers_give_the_same_store(demo, tmp_path):
    d, tok_path = demo
    src = d / SPLIT_FILES["general_train"]
    one = preprocess(src, tok_path, tmp_path / "one", seq_length=64, progress=False)
    two = preprocess(src, tok_path, tmp_path / "two", seq_length=64, workers=2, progress=False)
    assert one["fingerprint"] == two["fingerprint"]


def test_verify_detects_altered_arrays_and_dataset_pickles(demo, tmp_path):
    d, tok_path = demo
    preprocess(d / SPLIT_FILES["domain_heldout"], tok_path, tmp_path / "s", seq_length=64, progress=False)
    ds = TokenDataset(tmp_path / "s")
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[3]["tokens"].tolist() == ds[3]["tokens"].tolist()
    tokens = np.load(tmp_path / "s" / "tokens.npy")
    tokens[5] += 1
    np.save(tmp_path / "s" / "tokens.npy", tokens)
    with pytest.raises(ValueError, match="do not match the fingerprint"):
        TokenDataset(tmp_path / "s").verify()


def test_cli_end_to_end(demo, tmp_path, capsys):
    d, tok_path = demo
    src = d / SPLIT_FILES["domain_heldout"]
    args = ["preprocess", "--input", str(src), "--tokenizer", str(tok_path), "--out", str(tmp_path / "s"),
            "--seq-length", "24", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr()
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert f"{meta['num_samples']} samples added" in out.out
    assert f"{meta['truncated']} samples were longer than seq_length + 1 = 25" in out.err and meta["truncated"] > 0
    assert main(args) == 2
    assert "already holds a token store; use --append" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(args + ["--append"]) == 2  # same ids again
    assert TokenDataset(tmp_path / "s").meta["num_samples"] == len(_rows(src))


@pytest.mark.parametrize("content,fmt,message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', "instruction",
     r"bad.jsonl:2: invalid JSON: Expecting value at column \d+"),
    ('{"prompt": "a", "response": "b"}\n\n[1, 2]\n', "instruction", "bad.jsonl:3: expected a JSON object, got list"),
    ('{"prompt": "a"}\n', "instruction", "bad.jsonl:1: missing field 'response' \\(present: prompt\\)"),
    ('{"prompt": "a", "response": 7}\n', "instruction", "bad.jsonl:1: field 'response' must be a string, got int"),
    ('{"prompt": "a", "response": "b", "id": [1]}\n', "instruction", "bad.jsonl:1: field 'id' must be"),
    ('{"id": "x", "prompt": "a", "response": "b"}\n{"id": "x", "prompt": "c", "response": "d"}\n', "instruction",
     "bad.jsonl:2: duplicate sample id 'x' \\(already at .*bad.jsonl:1\\)"),
    ("\n\n", "instruction", "bad.jsonl: no samples"),
    ("  \n", "text", "bad.jsonl: no samples"),
])
def test_bad_input_errors_name_file_and_line(demo, tmp_path, capsys, content, fmt, message):
    _, tok_path = demo
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    args = ["preprocess", "--input", str(bad), "--tokenizer", str(tok_path), "--out", str(tmp_path / "s"),
            "--seq-length", "16", "--format", fmt]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("replay-megatron preprocess: error: ")
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing half-written


def test_cli_repeated_input_equals_create_then_append(demo, tmp_path):
    d, tok_path = demo
    first, second = (str(d / SPLIT_FILES[s]) for s in ("domain_heldout", "general_heldout"))
    common = ["--tokenizer", str(tok_path), "--seq-length", "24", "--no-progress"]
    assert main(["preprocess", "--input", first, "--input", second, "--out", str(tmp_path / "both"), *common]) == 0
    assert main(["preprocess", "--input", first, "--out", str(tmp_path / "one"), *common]) == 0
    assert main(["preprocess", "--input", second, "--out", str(tmp_path / "one"), "--append", *common]) == 0
    both, one = TokenDataset(tmp_path / "both"), TokenDataset(tmp_path / "one")
    assert both.fingerprint == one.fingerprint and both.string_ids == one.string_ids


def test_missing_paths_are_named(demo, tmp_path, capsys):
    _, tok_path = demo
    assert main(["preprocess", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer", str(tok_path),
                 "--out", str(tmp_path / "s"), "--seq-length", "8"]) == 2
    assert f"input file not found: {tmp_path / 'nope.jsonl'}" in capsys.readouterr().err
    # a missing later --input is refused before the first one overwrites anything
    d, _ = demo
    first = str(d / SPLIT_FILES["domain_heldout"])
    common = ["--tokenizer", str(tok_path), "--out", str(tmp_path / "s"), "--seq-length", "8", "--no-progress"]
    assert main(["preprocess", "--input", first, *common]) == 0
    before = TokenDataset(tmp_path / "s").fingerprint
    other = str(d / SPLIT_FILES["general_heldout"])
    assert main(["preprocess", "--input", other, "--input", str(tmp_path / "later.jsonl"), "--overwrite",
                 *common]) == 2
    assert f"input file not found: {tmp_path / 'later.jsonl'}" in capsys.readouterr().err
    assert TokenDataset(tmp_path / "s").fingerprint == before
    with pytest.raises(FileNotFoundError, match=f"not a token store \\(no meta.json\\): {tmp_path}"):
        TokenDataset(tmp_path)
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="exists and is not a token store"):
        preprocess(tok_path, tok_path, tmp_path, seq_length=8, fmt="text", mode="overwrite", progress=False)
