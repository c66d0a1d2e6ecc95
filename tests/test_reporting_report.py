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
    from replay_megatron.replay.store_writer import ReplayStoreWriter, finalize_store

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


def _run_of(tmp_path: Path, seed: int, loss: float, perplexity: float, accuracy: float, *overrides: str,
            base_perplexity: float = 10.0) -> Path:
    """A full-softmax run of configs/base/cpu_tiny.yaml with `run.seed=seed` (under runs/seed<seed>): two
    logged steps ending at `loss`, and an eval.json."""
    from replay_megatron.config import load_config, save_resolved

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/base/cpu_tiny.yaml",
                      ["run.name=sft", f"run.seed={seed}", f"run.out_dir={tmp_path / 'runs' / f'seed{seed}'}",
                       "train.loss=full", f"run.data_root={tmp_path}", *overrides])
    run = cfg.run_dir
    run.mkdir(parents=True)
    save_resolved(cfg, run)
    _jsonl(run / "metrics.jsonl", _metrics([loss + 1, loss], [1.0, 1.0], [0.5, 0.5], [100, 100]))
    (run / "eval.json").write_text(json.dumps({
        "base": {"perplexity": base_perplexity}, "finetuned": {"perplexity": perplexity},
        "perplexity_change": perplexity - base_perplexity,
        "perplexity_change_rel": (perplexity - base_perplexity) / base_perplexity, "relative_l2": 0.1,
        "domain": {"accuracy": accuracy}}))
    return run


def test_repeats_over_seeds_share_a_column_with_mean_and_std_beside_the_base(tmp_path):
    """Three seeds of one config: one column, mean ± sample std by hand; a run with another lr its own
    column; the base column shows only its own eval (perplexity, domain accuracy); a run whose eval saw
    another base perplexity is named in a note."""
    seeds = [_run_of(tmp_path, 1, 1.0, 11.0, 0.2), _run_of(tmp_path, 2, 2.0, 12.0, 0.3),
             _run_of(tmp_path, 3, 4.0, 16.0, 0.4, base_perplexity=10.5)]
    other = _run_of(tmp_path, 4, 3.0, 13.0, 0.5, "optimizer.lr=2e-3")
    base = _run_of(tmp_path, 5, 0.5, 10.0, 0.1, "run.name=base")
    assert main(["report", "--base", str(base), *map(str, seeds), str(other), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())

    assert [r["name"] for r in report["runs"]] == ["sft seed 1", "sft seed 2", "sft seed 3", "sft seed 4"]
    repeats, single = report["columns"]
    assert repeats["seeds"] == [1, 2, 3] and single["seeds"] == [4]
    assert repeats["mean"]["final_loss"] == pytest.approx(7 / 3)
    assert repeats["std"]["final_loss"] == pytest.approx(math.sqrt(7 / 3))  # squared deviations 42/9, over n-1
    assert repeats["mean"]["perplexity"] == 13.0 and repeats["std"]["perplexity"] == pytest.approx(math.sqrt(7))
    assert repeats["mean"]["steps"] == 2 and repeats["std"]["steps"] is None  # shared by all: as it is
    assert single["mean"]["final_loss"] == 3.0 and single["std"]["final_loss"] is None
    assert report["base"]["perplexity"] == 10.0 and report["base"]["domain_accuracy"] == 0.1
    assert report["notes"] == [f"{seeds[2]}: its eval's base perplexity 10.5000 is not the base column's 10.0000 "
                               "(other base weights or eval data)"]
    md = (tmp_path / "out" / "report.md").read_text().splitlines()
    labels = (single["label"], repeats["label"])
    assert labels[0] == str(other) and labels[1] == str(seeds[0]), labels  # one name, two configs
    for row in (f"| metric | base | {seeds[0]} (n=3) | {other} |",
                "| final loss | - | 2.3333 ± 1.5275 | 3.0000 |",
                "| general perplexity (held-out) | 10.0000 | 13.0000 ± 2.6458 | 13.0000 |",
                "| domain accuracy | 0.100 | 0.300 ± 0.100 | 0.500 |", "| steps | - | 2 | 2 |",
                "| relative L2 to base | - | 1.000e-01 | 1.000e-01 |"):
        assert row in md, row


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
