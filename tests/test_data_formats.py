"""Input files and shapes for `preprocess`: JSONL / JSON / Parquet, instruction / chat / alpaca / sharegpt,
`--map`; one conversation in every layout gives the same store; errors name file, line or row, field."""
import json
import re

import pytest

from chat_fixtures import build_qwen3_tokenizer
from replay_megatron.cli.main import main
from replay_megatron.data.chat import ChatOptions
from replay_megatron.data.formats import DataError, parse_map, read_records
from replay_megatron.data.token_store import TokenDataset
from replay_megatron.data.tokenizer import HFTokenizer

TALKS = [
    [("system", "You are terse."), ("user", "What is 7 + 3?"), ("assistant", "10"), ("user", "And 12 + 30?"),
     ("assistant", "The answer is 42.")],
    [("user", "Name the staff.\nSELECT name FROM staff"), ("assistant", "SELECT name FROM staff WHERE dept = 'sales'")],
]


def as_chat(talk, i):
    return {"id": f"t{i}", "messages": [{"role": r, "content": c} for r, c in talk]}


def as_sharegpt(talk, i):
    who = {"user": "human", "assistant": "gpt"}
    system = [c for r, c in talk if r == "system"]
    out = {"id": f"t{i}", "conversations": [{"from": who[r], "value": c} for r, c in talk if r != "system"]}
    return {**out, "system": system[0]} if system else out


def as_alpaca(talk, i):
    body = [c for r, c in talk if r != "system"]
    pairs = [body[k:k + 2] for k in range(0, len(body) - 2, 2)]
    query, _, extra = body[-2].partition("\n")
    out = {"id": f"t{i}", "instruction": query, "input": extra, "output": body[-1], "history": pairs}
    system = [c for r, c in talk if r == "system"]
    return {**out, "system": system[0]} if system else out


def as_mapped_chat(talk, i):
    who = {"system": "system", "user": "user", "assistant": "bot"}
    return {"id": f"t{i}", "dialog": [{"speaker": who[r], "text": c} for r, c in talk]}


LAYOUTS = {"chat": (as_chat, []), "sharegpt": (as_sharegpt, []), "alpaca": (as_alpaca, []),
           "mapped": (as_mapped_chat, ["messages=dialog,role=speaker", "content=text", "role:assistant=bot"])}


def write(path, objects):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(objects), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(objects, indent=2))
    else:
        path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return build_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3"))


def _preprocess(tmp_path, tok, src, fmt, *extra):
    out = tmp_path / f"store-{src.name}"
    assert main(["preprocess", "--input", str(src), "--tokenizer", str(tok), "--out", str(out), "--seq-length", "256",
                 "--format", fmt, "--no-progress", *extra]) == 0
    return TokenDataset(out)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_every_layout_and_file_type_gives_the_conversations_own_tokens_and_masks(qwen3, tmp_path, suffix):
    tok = HFTokenizer(qwen3)
    for name, (layout, mapping) in LAYOUTS.items():
        src = write(tmp_path / f"{name}{suffix}", [layout(t, i) for i, t in enumerate(TALKS)])
        fmt = "chat" if name == "mapped" else name
        ds = _preprocess(tmp_path, qwen3, src, fmt, *(a for m in mapping for a in ("--map", m)))
        assert ds.string_ids == ["t0", "t1"], name
        for i, talk in enumerate(TALKS):
            ids, mask = tok.encode_chat([{"role": r, "content": c} for r, c in talk])
            assert ds[i]["tokens"].tolist() == ids and ds[i]["loss_mask"].tolist() == mask, (name, i)
        source = ds.meta["sources"][0]
        assert source["format"] == fmt and source["chat"] == ChatOptions().as_dict()


def test_instruction_shape_with_system_and_default_ids(tmp_path):
    src = write(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r", "system": "s"}, {"question": "q", "answer": "a"}])
    first = next(read_records(src, "instruction"))
    assert (first.where, first.sid) == (f"{src}:1", "d.jsonl:1")
    assert first.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "p"},
                              {"role": "assistant", "content": "r"}]
    mapped = read_records(src, "instruction", parse_map(["prompt=question,response=answer"], "instruction"))
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'question' \(present: prompt, response, system\)"):
        next(mapped)
    src.write_text(src.read_text().splitlines()[1])
    (only,) = read_records(src, "instruction", parse_map(["prompt=question,response=answer"], "instruction"))
    assert only.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_loss_on_last_and_thinking_options_reach_the_store(qwen3, tmp_path):
    src = write(tmp_path / "c.jsonl", [as_chat(TALKS[0], 0)])
    ds = _preprocess(tmp_path, qwen3, src, "chat", "--loss-on", "last", "--no-enable-thinking")
    ids, mask = HFTokenizer(qwen3).encode_chat([{"role": r, "content": c} for r, c in TALKS[0]],
                                               ChatOptions(loss_on="last", enable_thinking=False))
    assert ds[0]["tokens"].tolist() == ids and ds[0]["loss_mask"].tolist() == mask
    assert ds.meta["sources"][0]["chat"] == {"loss_on": "last", "enable_thinking": False, "train_empty_think": False}


CHAT_OK = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
GOOD = {"chat": CHAT_OK, "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "alpaca": {"instruction": "q", "output": "a"}}


@pytest.mark.parametrize("name,content,fmt,message", [
    ("bad.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n', "instruction",
     r"bad.jsonl:2: not UTF-8 text \(byte 0xff at byte 13 of the line\)"),
    ("bad.txt", b"fine\nbad \xc3\x28\n", "text", r"bad.txt:2: not UTF-8 text \(byte 0xc3 at byte 5"),
    ("bad.jsonl", b'{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n', "chat",
     r"bad.jsonl:1: field 'messages'\[1\].role: unknown role 'bot' \(known: assistant, system, user; rename one "
     r"with --map role:assistant=bot\)"),
    ("bad.jsonl", b'{"messages": [{"role": "user", "content": 3}]}\n', "chat",
     r"bad.jsonl:1: field 'messages'\[0\].content: must be a string, is a int"),
    ("bad.jsonl", b'{"messages": [{"role": "user", "content": "q"}]}\n', "chat",
     "bad.jsonl:1: the conversation has no assistant message"),
    ("bad.jsonl", b'{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, '
                  b'{"role": "assistant", "content": "a"}]}\n', "chat",
     r"bad.jsonl:1: a system message may only come first \(message 1\)"),
    ("bad.jsonl", b'{"conversations": [{"from": "gpt", "value": "a"}]}\n', "sharegpt",
     "bad.jsonl:1: the conversation must start with a user message"),
    ("bad.jsonl", b'{"instruction": "q", "output": "a", "history": [["x"]]}\n', "alpaca",
     r"bad.jsonl:1: field 'history'\[0\]: expected \[user text, assistant text\]"),
    ("bad.json", b'[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "a"}\n]\n', "instruction",
     r"bad.json:3: missing field 'response'"),
    ("bad.json", b'[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "a",\n]\n', "instruction",
     r"bad.json:4: invalid JSON"),
    ("bad.parquet", [CHAT_OK, {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}],
     "chat", r"bad.parquet: row 2: the conversation has no assistant message"),
])
def test_bad_records_name_file_line_and_field_and_nothing_is_written(qwen3, tmp_path, capsys, name, content, fmt,
                                                                     message):
    good = write(tmp_path / "good.jsonl", [GOOD.get(fmt, {"prompt": "a", "response": "b"})])
    bad = tmp_path / name
    if isinstance(content, list):
        write(bad, content)
    else:
        bad.write_bytes(content)
    args = ["preprocess", "--input", str(good), "--input", str(bad), "--tokenizer", str(qwen3),
            "--out", str(tmp_path / "s"), "--seq-length", "16", "--format", fmt]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("replay-megatron preprocess: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.*"))  # nothing half-written


def test_map_entries_are_checked(tmp_path, capsys):
    with pytest.raises(DataError, match=r"--map 'prompt': expected NAME=FIELD"):
        parse_map(["prompt"], "instruction")
    with pytest.raises(DataError, match=r"--map 'role:user=h': format 'instruction' has no field 'role:user'"):
        parse_map(["role:user=h"], "instruction")
    assert parse_map(["role:user=human, content=text"], "chat") == {"role:user": "human", "content": "text"}
