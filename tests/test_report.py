"""`report` on hand-written run dirs: report.md rows, report.json numbers (by hand), the PNG files, and "-"
where a run lacks resolved.yaml / summary.json / eval.json / a replay store."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from replay_megatron.cli.main import main
from replay_megatron.reporting.report import write_report

VOCAB = 512
K_MAX = 4


def _jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _metrics(losses, norms, step_times, tokens_per_s, extra=None):
    return [{"step": i + 1, "loss": loss, "lr": 1e-3, "grad_norm": g, "skipped": False, "tokens": 100,
             "tokens_per_s": tps, "step_time_s": t, "peak_memory_bytes": 1000 * (i + 1), "consumed_samples": 4 * i,
             **((extra or {}).get(i, {}))}
            for i, (loss, g, t, tps) in enumerate(zip(losses, norms, step_times, tokens_per_s))]


def _write_store(directory: Path):
    """Two samples with K_t = [1, 2, 3] and [3] (gold first among the candidates)."""
    from replay_megatron.replay.selection import TopKSelection
    from replay_megatron.replay.store import ReplayStoreWriter, finalize_store

    writer = ReplayStoreWriter(directory, 0, k_max=K_MAX)
    for sid, ks in ((0, [1, 2, 3]), (1, [3])):
        targets = torch.arange(10, 10 + len(ks))
        candidates = torch.full((len(ks), K_MAX + 1), -1, dtype=torch.long)
        for row, (k, t) in enumerate(zip(ks, targets.tolist())):
            candidates[row, :k] = torch.tensor([t] + [100 + j for j in range(k - 1)])
        writer.add(sid, torch.arange(1, 1 + len(ks)), targets,
                   TopKSelection(candidates, torch.tensor(ks), torch.full((len(ks),), 0.9)))
    writer.close()
    finalize_store(directory, 1, config={}, fingerprints={"model": "m", "tokenizer": "t", "dataset": "d"},
                   vocab_size=VOCAB)


@pytest.fixture
def runs(tmp_path):
    """A replay + MoClip run with every file, and a bare run with metrics.jsonl only."""
    from replay_megatron.config import load_config, save_resolved

    root = Path(__file__).resolve().parents[1]
    replay = tmp_path / "runs" / "replay_run"
    replay.mkdir(parents=True)
    cfg = load_config(root / "configs/base/cpu_tiny.yaml", ["run.name=replay_run", f"run.data_root={tmp_path}"])
    save_resolved(cfg, replay)
    store = tmp_path / cfg.train.replay_store
    _write_store(store)
    (store / "collect_timing.json").write_text(json.dumps({"wall_s": 12.5, "seconds_per_micro_batch": 0.25}))
    _jsonl(replay / "metrics.jsonl", _metrics([3.0, 2.0, 1.5], [1.0, 1.0, 1.0], [0.5, 0.5, 0.7], [100, 200, 300],
                                             extra={i: {"cos_phi": 0.9 - 0.1 * i, "clip_rate": 0.0} for i in range(3)}))
    (replay / "summary.json").write_text(json.dumps({
        "steps": 3, "final_loss": 1.5, "loss": "replay", "optimizer": "moclip",
        "stability": {"loss_std": 0.5, "grad_norm_cv": 0.25, "spike_count": 1}}))
    (replay / "eval.json").write_text(json.dumps({
        "perplexity_change": 0.25, "perplexity_change_rel": 0.05, "relative_l2": 1.5e-3,
        "domain": {"accuracy": 0.4, "examples": 10, "correct": 4, "task": "sql_execution"}}))

    bare = tmp_path / "runs" / "bare"
    bare.mkdir()
    _jsonl(bare / "metrics.jsonl", _metrics([4.0, 3.0, 2.5, 2.2, 2.0, 1.9], [1, 2, 1, 2, 1, 2],
                                            [1, 2, 3, 4, 5, 100], [10, 20, 30, 40, 50, 60]))
    return replay, bare, store


def test_report_numbers_table_and_plots(runs, tmp_path):
    replay, bare, store = runs
    out = tmp_path / "out"
    report = write_report([replay, bare], out)

    r, b = report["runs"]
    assert r["method"] == "replay + moclip" and b["method"] is None
    assert (r["steps"], r["final_loss"], r["loss_std"], r["grad_norm_cv"], r["spike_count"]) == (3, 1.5, 0.5, 0.25, 1)
    assert r["median_step_time_s"] == 0.5 and r["tokens_per_s"] == 200 and r["peak_memory_bytes"] == 3000
    assert (r["perplexity_change"], r["relative_l2"], r["domain_accuracy"]) == (0.25, 1.5e-3, 0.4)
    # K_t = [1, 2, 3, 3]; candidates 1+2+3+3 = 9 stored for 4 positions
    assert r["k_median"] == 2.5 and r["k_mean"] == 2.25
    assert (r["stage0_time_s"], r["stage0_s_per_micro_batch"]) == (12.5, 0.25)
    manifest = json.loads((store / "manifest.json").read_text())
    assert r["storage_bytes_per_position"] == manifest["totals"]["bytes"] / 4
    assert r["storage_fraction_of_fp16_logits"] == pytest.approx(manifest["totals"]["bytes"] / 4 / (2 * VOCAB))

    # the bare run: stability from metrics.jsonl (population std of [4, 3, 2.5, 2.2, 2, 1.9]: mean 2.6,
    # squared deviations sum 3.14), grad-norm CV of [1, 2] x 3 = 0.5 / 1.5; no spike (window 50 never full)
    assert b["steps"] == 6 and b["final_loss"] == 1.9
    assert b["loss_std"] == pytest.approx(math.sqrt(3.14 / 6), rel=1e-12)
    assert b["grad_norm_cv"] == pytest.approx(1 / 3, rel=1e-12) and b["spike_count"] == 0
    assert b["median_step_time_s"] == 3.5 and b["tokens_per_s"] == 35 and b["peak_memory_bytes"] == 6000
    for key in ("perplexity_change", "relative_l2", "domain_accuracy", "k_median", "stage0_time_s"):
        assert b[key] is None

    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text().splitlines()
    for row in ("| metric | replay_run | bare |", "| method (loss + optimizer) | replay + moclip | - |",
                "| final loss | 1.5000 | 1.9000 |", "| loss std (after warm-up) | 0.5000 | 0.7234 |",
                "| grad-norm CV | 0.250 | 0.333 |", "| loss spikes | 1 | 0 |",
                "| perplexity change (ft - base) | +0.2500 | - |", "| perplexity change (relative) | +5.00% | - |",
                "| relative L2 to base | 1.500e-03 | - |", "| domain accuracy | 0.400 | - |",
                "| Stage 0 time (s) | 12.5 | - |", "| Stage 0 s per micro-batch | 0.250 | - |",
                "| K_t median | 2.5 | - |",
                "| Stage 0 storage / fp16 logits | " + f"{100 * r['storage_fraction_of_fp16_logits']:.3f}% | - |"):
        assert row in md, row

    names = sorted(report["plots"])
    assert names == ["plots/cos_phi.png", "plots/grad_norm.png", "plots/k_hist_0_replay_run.png", "plots/loss.png"]
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_k_values_are_the_stores_per_position_counts(runs):
    from replay_megatron.reporting.plots import k_values

    assert np.array_equal(np.sort(k_values(runs[2])), [1, 2, 3, 3])


def test_cli_and_missing_metrics(runs, tmp_path, capsys):
    replay, bare, _ = runs
    assert main(["report", str(replay)]) == 0  # one run: into the run dir itself
    assert (replay / "report.md").is_file() and (replay / "plots" / "loss.png").is_file()
    (bare / "metrics.jsonl").unlink()
    assert main(["report", str(replay), str(bare), "--out", str(tmp_path / "o")]) == 2
    assert f"{bare / 'metrics.jsonl'}: no metrics" in capsys.readouterr().err


def test_a_broken_replay_store_is_refused_naming_the_file(runs, tmp_path, capsys):
    replay, _, store = runs
    shard = store / "shard-00000" / "k.npy"
    shard.unlink()
    assert main(["report", str(replay), "--out", str(tmp_path / "o")]) == 2
    assert str(shard) in capsys.readouterr().err
