"""Stage 0 `collect` (SPEC.md section 1, issue 3 item 4): the store is the same whatever the layout or a crash.

One module fixture runs three spawned jobs on a tiny Qwen3 saved as an HF dir and a tiny token store:
TP2xPP2 (4 ranks), DP2 (2 ranks), and on one rank an uninterrupted TP1xPP1 run plus a run stopped after two
micro-batches (uncommitted samples lost, one micro-batch half committed) and then resumed. References:
TP1xPP1 for the layouts (candidate sets equal except where a cumulative mass lies within 1e-5 of tau; K_t,
positions and gold equal; masses and logits to 1e-5/1e-4), and byte equality of manifest and shard files
for the resume.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from qwen3_fixtures import tiny_hf_config, tiny_hf_model
from train_fixtures import SEQ, write_token_store
from replay_megatron.config import load_config
from replay_megatron.data.packing import pack_lengths
from replay_megatron.data.token_store import TokenDataset
from replay_megatron.platform.spawn import run_local
from replay_megatron.platform.writer_lock import LOCK_NAME
from replay_megatron.replay.records import TIMING_RECORD
from replay_megatron.replay.store import ReplayStore, ReplayStoreError

pytestmark = pytest.mark.mcore_compat  # CI also runs these on megatron-core 0.12.1 (README)


TAU, K_MAX = 0.9, 16
NEAR_TAU = 1e-5


def _token_store(out: Path, tokenizer_fp: str, seed: int = 0, n: int = 11) -> None:
    """n samples of varying length; instruction-like masks (loss on the tail), vocabulary 500 of the model's 512."""
    write_token_store(out, n, seed, tokenizer_fp)


def _config(root: Path, name: str, tp: int = 1, pp: int = 1, store: str | None = None, data: str = "tokens",
            packing: bool = False):
    body = {"run": {"name": name, "data_root": str(root), "seed": 7}, "platform": {"device": "cpu"},
            "model": {"hf_path": "hf", "params_dtype": "fp32", "make_vocab_size_divisible_by": 128},
            "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
            "data": {"train": data, "seq_length": SEQ, "packing": packing},
            "collect": {"tau": TAU, "k_max": K_MAX, "store_logits": "fp32", "micro_batch_size": 2,
                        "store_dir": store or f"stores/{name}",
                        "positions": {"strategy": "bucket", "amount": 0.5, "buckets": 2}},
            "logging": {"progress_bar": False}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def collect_job(config_path: str, runs: list[dict]) -> list:
    """On each rank: collect once per entry of `runs` (kwargs of `collect`), tearing down between runs;
    returns per run the summary (rank 0) and the files then in the store dir."""
    import os

    from replay_megatron.platform.distributed import shutdown
    from replay_megatron.runs.collect import collect

    results = []
    for kwargs in runs:
        cfg = load_config(kwargs.pop("config", config_path), world_size=int(os.environ["WORLD_SIZE"]))
        summary = collect(cfg, **kwargs)
        shutdown()
        store = cfg.input_path(cfg.collect.store_dir)
        results.append((summary, sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())))
    return results


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    hf = tiny_hf_config(vocab_size=500)  # padded to 512 at TP1 and TP2: rows 500-511 are padding
    model = tiny_hf_model(hf)
    with torch.no_grad():  # sharper next-token distributions, so K_t spreads below K_MAX
        model.model.norm.weight.mul_(3.0)
    model.save_pretrained(root / "hf")
    _token_store(root / "tokens", "tok-a")
    ref = _config(root, "ref")
    resumed = _config(root, "resumed")
    (_, stopped, _), = run_local(collect_job, 1, str(ref), [
        {}, {"config": str(resumed), "stop_after": 2, "commit_every": 3}, {"config": str(resumed), "commit_every": 3}])
    # What the "kill" left: samples 0-2 committed as one part (sample 3 was pending), no shard, no manifest.
    assert stopped == (None, [LOCK_NAME, "collect.json", "parts-00000/part-000000.npz", "parts-00000/writer.json",
                              "resolved.yaml"])
    run_local(collect_job, 4, str(_config(root, "tp2pp2", tp=2, pp=2)), [{}])
    run_local(collect_job, 2, str(_config(root, "dp2")), [{}])
    run_local(collect_job, 1, str(_config(root, "packed", packing=True)), [{}])
    return root


def _records(store: ReplayStore) -> dict[int, object]:
    return {int(i): store.get(int(i)) for i in store.sample_ids()}


def _near_tau(sample) -> torch.Tensor:
    """Rows whose cumulative mass at K_t or K_t - 1 lies within NEAR_TAU of tau (from the stored fp32 logits)."""
    p = torch.exp(sample.candidate_logits - sample.lse[:, None])
    before = sample.covered_mass - p.gather(1, (sample.k - 1)[:, None]).squeeze(1)
    return ((sample.covered_mass - TAU).abs() < NEAR_TAU) | ((before - TAU).abs() < NEAR_TAU)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["tp2pp2", "dp2", "packed"])
def test_layouts_store_the_same_records(stores, layout):
    ref = ReplayStore.open(stores / "stores/ref")
    got = ReplayStore.open(stores / f"stores/{layout}")
    assert np.array_equal(ref.sample_ids(), np.arange(11)) and np.array_equal(got.sample_ids(), ref.sample_ids())
    shard_ids = [set(np.load(s / "sample_ids.npy").tolist()) for s in sorted((stores / f"stores/{layout}").glob("shard-*"))]
    assert len(shard_ids) == (2 if layout == "dp2" else 1) and set.union(*shard_ids) == set(range(11))
    assert sum(map(len, shard_ids)) == 11  # disjoint shards
    summary = ref.summary()
    assert all(int(r.candidates.max()) < 500 for r in _records(got).values())  # never a padded row
    assert 1.5 < summary["k_mean"] < K_MAX - 1 and summary["gold_appended_rate"] > 0  # a non-trivial selection
    exempt = 0
    for sid, (a, b) in enumerate(zip(_records(ref).values(), _records(got).values())):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.targets, b.targets), sid
        near = _near_tau(a) | _near_tau(b)
        exempt += int(near.sum())
        assert torch.equal(a.k[~near], b.k[~near]), sid
        assert torch.equal(a.candidates[~near], b.candidates[~near]), sid
        torch.testing.assert_close(a.covered_mass, b.covered_mass, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.lse, b.lse, atol=1e-4, rtol=0)
        finite = torch.isfinite(a.candidate_logits) & torch.isfinite(b.candidate_logits)
        torch.testing.assert_close(a.candidate_logits[finite & ~near[:, None]],
                                   b.candidate_logits[finite & ~near[:, None]], atol=1e-4, rtol=0)
    assert exempt <= 2  # the tolerance excuses the odd row, not the comparison
    # Stage 0 throughput counts real tokens over all DP ranks; the rest of the rows is padding
    timing = json.loads((stores / f"stores/{layout}" / TIMING_RECORD).read_text())
    positions = np.minimum(TokenDataset(stores / "tokens").lengths - 1, SEQ)
    rows = len(pack_lengths(positions, SEQ)) if layout == "packed" else 11
    assert layout != "packed" or rows < 11  # packing saved rows
    assert timing["tokens"] == positions.sum() and timing["padding_fraction"] == pytest.approx(
        1 - positions.sum() / (rows * SEQ))


@pytest.mark.multiproc
def test_resumed_store_is_byte_identical(stores):
    ref, resumed = stores / "stores/ref", stores / "stores/resumed"
    run_records = {"resolved.yaml", TIMING_RECORD}  # the run's config and wall time, not the store
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file() and p.name not in run_records)
    assert "manifest.json" in {f.name for f in files} and any(f.name == "candidate_ids.npy" for f in files)
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*")
                           if p.is_file() and p.name not in run_records)
    for f in files:
        assert (ref / f).read_bytes() == (resumed / f).read_bytes(), f


def test_select_records_masks_vocab_padding_and_equals_dynamic_topk():
    """One micro-batch by hand: padded columns (huge logits here) never chosen; rows = dynamic_topk on the
    real vocabulary at the loss-bearing positions."""
    from replay_megatron.replay.records import CollectSettings, select_records
    from replay_megatron.replay.selection import dynamic_topk

    g = torch.Generator().manual_seed(0)
    vocab, padded = 30, 32
    logits = torch.randn(2, 6, padded, generator=g) * 3
    logits[..., vocab:] = 100.0
    labels = torch.randint(0, vocab, (2, 6), generator=g)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    settings = CollectSettings(tau=TAU, k_max=4, strategy="all", amount=1.0, buckets=1, seed=0, store_logits=None,
                               micro_batch_size=2, seq_length=6)
    expected_logits = logits[..., :vocab].clone()
    records = select_records(logits, labels, loss_mask, torch.tensor([[5, 0, 0, 6], [-1, 1, 0, 6]]), settings,
                             vocab_size=vocab)
    assert [r.sample_id for r in records] == [5]  # the -1 row is a filler
    (r,) = records
    assert r.positions.tolist() == [2, 3, 4] and torch.equal(r.targets, labels[0, 2:5])
    ref = dynamic_topk(expected_logits[0, 2:5], labels[0, 2:5], TAU, 4)
    assert torch.equal(r.selection.candidates, ref.candidates) and torch.equal(r.selection.k, ref.k)


def _mtimes(store: Path) -> dict[Path, int]:
    """Modification times of a store's files (not its writer lock, which every `collect` takes first)."""
    return {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.name != LOCK_NAME}


@pytest.mark.multiproc
def test_mismatched_tokenizer_or_dataset_refused_before_work(stores):
    from replay_megatron.runs.collect import collect

    _token_store(stores / "tokens_other_tok", "tok-b")  # same arrays, another tokenizer
    _token_store(stores / "tokens_other_data", "tok-a", seed=1)  # same tokenizer, other samples
    before = _mtimes(stores / "stores/ref")
    for data, what in (("tokens_other_tok", "tokenizer"), ("tokens_other_data", "dataset")):
        cfg = load_config(_config(stores, f"bad_{what}", store="stores/ref", data=data), world_size=1)
        with pytest.raises(ReplayStoreError, match=f"another {what}: fingerprint '{what}' differs"):
            collect(cfg, world_size=1)  # raises in preflight, before any process group or model exists
    assert before == _mtimes(stores / "stores/ref")
