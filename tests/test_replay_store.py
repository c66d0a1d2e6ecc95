"""Replay store: round trip, DP shards == one shard, crash + resume == uninterrupted, named errors; fingerprints."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from replay_megatron.replay.fingerprint import fingerprint_files, fingerprint_json, fingerprint_state_dict
from replay_megatron.replay.selection import dynamic_topk
from replay_megatron.replay.store_writer import ReplayStoreWriter, finalize_store
from replay_megatron.replay.store import (
    ReplayStore, ReplayStoreError, shard_name,
)

VOCAB, K_MAX = 300, 20
FINGERPRINTS = {"model": "m" * 64, "tokenizer": "t" * 64, "dataset": "d" * 64}
CONFIG = {"collect": {"tau": 0.9, "k_max": K_MAX, "positions": {"strategy": "bucket", "amount": 0.5}}}


def make_samples(count: int = 24, seed: int = 0) -> dict[int, tuple]:
    """Sample id -> (positions, targets, dynamic_topk selection with logits); some samples store nothing."""
    rng = np.random.default_rng(seed)
    samples = {}
    for sid in rng.permutation(1000)[:count].tolist():
        n = int(rng.integers(0, 7))
        positions = torch.from_numpy(np.sort(rng.permutation(64)[:n]))
        logits = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(sid)) * float(rng.choice([1, 4]))
        targets = torch.from_numpy(rng.integers(0, VOCAB, n))
        samples[sid] = (positions, targets, dynamic_topk(logits, targets, 0.9, K_MAX, return_logits=True))
    return samples


def write_store(directory: Path, samples: dict, ranks: list[list[int]], logits_dtype: str | None = "fp16",
                commit_every: int = 3) -> dict:
    for rank, ids in enumerate(ranks):
        writer = ReplayStoreWriter(directory, rank, k_max=K_MAX, logits_dtype=logits_dtype, commit_every=commit_every)
        for sid in ids:
            writer.add(sid, *samples[sid])
        writer.close()
    return finalize_store(directory, len(ranks), config=CONFIG, fingerprints=FINGERPRINTS, vocab_size=VOCAB)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_records(a: ReplayStore, b: ReplayStore) -> None:
    assert a.sample_ids().tolist() == b.sample_ids().tolist()
    for sid in a.sample_ids():
        for x, y in zip(a.get(int(sid)), b.get(int(sid))):
            assert (x is None and y is None) or torch.equal(x, y), sid


@pytest.mark.parametrize("logits_dtype", [None, "fp16", "bf16", "fp32"])
def test_round_trip(tmp_path: Path, logits_dtype: str | None) -> None:
    samples = make_samples()
    ids = list(samples)
    write_store(tmp_path, samples, [ids], logits_dtype)
    store = ReplayStore.open(tmp_path, expect=FINGERPRINTS)
    assert store.sample_ids().tolist() == sorted(ids) and len(store) == len(ids)
    for sid, (positions, targets, sel) in samples.items():
        got = store.get(sid)
        assert torch.equal(got.positions, positions.long()) and torch.equal(got.targets, targets.long())
        assert torch.equal(got.candidates, sel.candidates) and torch.equal(got.k, sel.k)
        assert torch.equal(got.covered_mass, sel.covered_mass)
        if logits_dtype is None:
            assert got.candidate_logits is None and got.lse is None
        else:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[logits_dtype]
            assert torch.equal(got.candidate_logits, sel.candidate_logits.to(dtype).float())
            assert torch.equal(got.lse, sel.lse)
    with pytest.raises(KeyError, match="sample id 1000 is not in replay store"):
        store.get(1000)

    summary = store.summary()
    k = torch.cat([s[2].k for s in samples.values()]).numpy()
    appended = torch.cat([(s[2].candidates.gather(1, s[2].k[:, None]) >= 0).squeeze(1) for s in samples.values()])
    assert summary["positions"] == k.size and summary["samples"] == len(ids)
    assert summary["k_median"] == np.median(k) and summary["k_p90"] == np.percentile(k, 90)
    assert summary["gold_appended_rate"] == pytest.approx(appended.float().mean().item())
    stored_bytes = sum(len(b) for name, b in tree_bytes(tmp_path).items() if name.startswith("shard-"))
    assert summary["bytes_per_position"] == stored_bytes / k.size
    assert summary["fraction_of_fp16_logits"] == pytest.approx(stored_bytes / k.size / (2 * VOCAB))
    # ragged on disk: candidate_ids holds exactly the valid candidates, no padding
    assert np.load(tmp_path / "shard-00000" / "candidate_ids.npy").size == sum(
        int((s[2].candidates >= 0).sum()) for s in samples.values())


def test_dp_shards_union_equals_one_shard(tmp_path: Path) -> None:
    samples = make_samples()
    ids = list(samples)
    write_store(tmp_path / "dp1", samples, [ids])
    write_store(tmp_path / "dp2", samples, [ids[0::2], ids[1::2]], commit_every=2)
    write_store(tmp_path / "dp3", samples, [ids[1::2], [], ids[0::2]])  # a rank that got no samples
    dp1, dp2 = ReplayStore.open(tmp_path / "dp1"), ReplayStore.open(tmp_path / "dp2")
    assert len(dp2.manifest["shards"]) == 2
    assert_same_records(dp1, dp2)
    assert len(pickle.dumps(dp2)) < 1000  # a re-open, not the mapped data
    assert_same_records(dp1, pickle.loads(pickle.dumps(dp2)))
    assert_same_records(dp1, ReplayStore.open(tmp_path / "dp3"))
    sizes = ("bytes", "bytes_per_position", "fraction_of_fp16_logits")  # two shards hold two sets of indexes
    assert {k: v for k, v in dp1.summary().items() if k not in sizes} == \
        {k: v for k, v in dp2.summary().items() if k not in sizes}


def test_crash_and_resume_gives_identical_store(tmp_path: Path) -> None:
    samples = make_samples()
    ids = list(samples)
    reference = write_store(tmp_path / "uninterrupted", samples, [ids[:10], ids[10:]])

    crashed = tmp_path / "resumed"
    w0 = ReplayStoreWriter(crashed, 0, k_max=K_MAX, logits_dtype="fp16", commit_every=2)
    for sid in ids[:7]:  # commits 2, 4, 6; the 7th is still pending when the process dies
        w0.add(sid, *samples[sid])
    (w0.parts_dir / ".part-000003.npz.x1y2.tmp").write_bytes(b"half a part")  # an atomic write cut short
    w1 = ReplayStoreWriter(crashed, 1, k_max=K_MAX, logits_dtype="fp16", commit_every=4)
    for sid in ids[10:]:
        w1.add(sid, *samples[sid])
    w1.close()
    (crashed / ".shard-00000.tmp").mkdir()  # a close() cut short
    with pytest.raises(ReplayStoreError, match="expected shards"):
        finalize_store(crashed, 2, config=CONFIG, fingerprints=FINGERPRINTS, vocab_size=VOCAB)

    r0 = ReplayStoreWriter(crashed, 0, k_max=K_MAX, logits_dtype="fp16", commit_every=5)
    assert r0.committed_sample_ids == frozenset(ids[:6])
    for sid in reversed(ids[:10]):  # another order and commit size than before the crash
        if sid not in r0.committed_sample_ids:
            r0.add(sid, *samples[sid])
    r0.close()
    r1 = ReplayStoreWriter(crashed, 1, k_max=K_MAX, logits_dtype="fp16")  # rank 1 had finished
    assert r1.committed_sample_ids == frozenset(ids[10:])
    with pytest.raises(ReplayStoreError, match="already closed"):
        r1.add(ids[0], *samples[ids[0]])
    r1.close()
    resumed = finalize_store(crashed, 2, config=CONFIG, fingerprints=FINGERPRINTS, vocab_size=VOCAB)
    assert resumed == reference
    assert tree_bytes(crashed) == tree_bytes(tmp_path / "uninterrupted")


def test_writer_refuses_misuse(tmp_path: Path) -> None:
    samples = make_samples(4)
    sid = next(s for s in samples if len(samples[s][0]))
    writer = ReplayStoreWriter(tmp_path, 0, k_max=K_MAX, commit_every=1)
    writer.add(sid, *samples[sid])
    with pytest.raises(ValueError, match=f"sample id {sid} .* already added"):
        writer.add(sid, *samples[sid])
    positions, targets, sel = samples[sid]
    with pytest.raises(ValueError, match="gold token is missing"):
        no_gold = sel._replace(candidates=torch.full_like(sel.candidates, -1))
        writer.add(sid + 1, positions, targets, no_gold)
    with pytest.raises(ReplayStoreError, match="writer.json was written with"):
        ReplayStoreWriter(tmp_path, 0, k_max=K_MAX + 1)
    with pytest.raises(ValueError, match="return_logits=True"):
        ReplayStoreWriter(tmp_path / "b", 0, k_max=K_MAX, logits_dtype="bf16").add(
            sid, positions, targets, sel._replace(candidate_logits=None, lse=None))


@pytest.fixture()
def store_dir(tmp_path: Path) -> Path:
    samples = make_samples(12)
    ids = list(samples)
    write_store(tmp_path, samples, [ids[:6], ids[6:]])
    return tmp_path


def test_flipped_byte_is_named(store_dir: Path) -> None:
    path = store_dir / "shard-00001" / "candidate_ids.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ReplayStoreError, match=r"shard-00001/candidate_ids\.npy is corrupted"):
        ReplayStore.open(store_dir)
    ReplayStore.open(store_dir, verify=False)  # documented: sizes only without verify


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_shard_is_named(store_dir: Path, verify: bool) -> None:
    path = store_dir / "shard-00000" / "positions.npy"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ReplayStoreError, match=r"shard-00000/positions\.npy is truncated"):
        ReplayStore.open(store_dir, verify=verify)


def test_missing_manifest_and_missing_shard_file(store_dir: Path) -> None:
    (store_dir / "shard-00000" / "k.npy").unlink()
    with pytest.raises(ReplayStoreError, match=r"shard-00000/k\.npy is missing"):
        ReplayStore.open(store_dir)
    (store_dir / "manifest.json").unlink()
    with pytest.raises(ReplayStoreError, match="manifest.json is missing"):
        ReplayStore.open(store_dir)


def test_fingerprint_mismatch_names_which(store_dir: Path) -> None:
    ReplayStore.open(store_dir, expect={"model": FINGERPRINTS["model"], "tokenizer": FINGERPRINTS["tokenizer"]})
    with pytest.raises(ReplayStoreError, match=f"'tokenizer' differs \\(store: {'t' * 64}, expected: other\\)"):
        ReplayStore.open(store_dir, expect={"model": FINGERPRINTS["model"], "tokenizer": "other"})
    with pytest.raises(ReplayStoreError, match="'dataset' differs"):
        ReplayStore.open(store_dir, expect={"dataset": "x"})


def test_version_mismatch(store_dir: Path) -> None:
    path = store_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 2
    path.write_text(json.dumps(manifest))
    with pytest.raises(ReplayStoreError, match="version 2 is not supported"):
        ReplayStore.open(store_dir)


def test_finalize_refuses_inconsistent_shards(tmp_path: Path) -> None:
    samples = make_samples(6)
    ids = list(samples)
    with pytest.raises(ReplayStoreError, match="stored by two shards"):
        write_store(tmp_path / "dup", samples, [ids[:4], ids[3:]])
    with pytest.raises(ReplayStoreError, match=r"expected shards \['shard-00000', 'shard-00001', 'shard-00002'\]"):
        finalize_store(tmp_path / "dup", 3, config=CONFIG, fingerprints=FINGERPRINTS, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="fingerprints must map exactly"):
        finalize_store(tmp_path / "dup", 2, config=CONFIG, fingerprints={"model": "m"}, vocab_size=VOCAB)
    assert shard_name(3) == "shard-00003"


def test_fingerprints(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / ".cache").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"\x00\x01weights")
    (ckpt / "config.json").write_text('{"vocab_size": 300}')
    (ckpt / ".cache" / "download.lock").write_text("1")
    digest = fingerprint_files([ckpt])
    shutil.copytree(ckpt, tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / ".cache" / "download.lock").write_text("2")  # hidden files do not count
    assert fingerprint_files([tmp_path / "elsewhere"]) == digest
    assert fingerprint_files([ckpt / "model.safetensors", ckpt / "config.json"]) == digest
    (tmp_path / "elsewhere" / "model.safetensors").write_bytes(b"\x00\x02weights")
    assert fingerprint_files([tmp_path / "elsewhere"]) != digest
    with pytest.raises(FileNotFoundError, match="nope"):
        fingerprint_files([tmp_path / "nope"])

    a = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    b = {"b": a["b"].clone(), "w": a["w"].clone()}
    assert fingerprint_state_dict(a) == fingerprint_state_dict(b)
    assert fingerprint_state_dict(a) != fingerprint_state_dict({**b, "w": b["w"].view(3, 2)})
    assert fingerprint_state_dict(a) != fingerprint_state_dict({**b, "w": b["w"].view(torch.int32)})
    assert fingerprint_state_dict(a) != fingerprint_state_dict({**b, "b": b["b"] * 2})
    assert fingerprint_json({"a": 1, "b": [2]}) == fingerprint_json({"b": [2], "a": 1}) != fingerprint_json({"a": 1})
