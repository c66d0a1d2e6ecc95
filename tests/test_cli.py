"""The CLI end to end (issue 6 acceptance): collect -> train -> eval -> report, launched with torchrun on
2 CPU ranks at TP2xPP1 and at TP1xPP2, on a tiny Qwen3 given as an HF checkpoint.

Numbers are checked against independent computations: the stored K_t against the manifest summary, the
HF export against the run's final megatron checkpoint (same logits), eval's perplexity against
transformers' own loss on the held-out set with the exported weights, eval's base perplexity against the
same with the starting weights, and the report's figures against the files they come from.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3_fixtures import tiny_hf_config, tiny_hf_model
from replay_megatron.data.dataset import make_batch
from replay_megatron.data.token_store import TokenDataset
from replay_megatron import run_dir as layout_of_run
from train_fixtures import SEQ, make_training_root

pytestmark = pytest.mark.multiproc
LAYOUTS = {"tp2pp1": ["parallel.tensor_model_parallel_size=2"], "tp1pp2": ["parallel.pipeline_model_parallel_size=2"]}


def _cli(root: Path, *args: str, nproc: int = 2) -> str:
    """Run `replay-megatron ARGS` under torchrun with `nproc` CPU ranks; returns stdout, fails with stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "replay_megatron", *args]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def _hf_loss(hf_dir: Path, dataset: TokenDataset) -> float:
    """Per-token mean loss of an HF model over every loss-bearing held-out token (transformers' forward)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    batch = make_batch([dataset[i] for i in range(len(dataset))], SEQ, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.tokens).logits.double()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")
    return float((nll * batch.loss_mask).sum() / batch.loss_mask.sum())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    config = make_training_root(root)
    hf = tiny_hf_config()
    tiny_hf_model(hf).save_pretrained(root / "hf_base", safe_serialization=True)
    common = ["model.preset=null", "model.hf_path=hf_base", "train.export_hf=true", "train.eval_interval=3"]
    runs = {}
    for name, layout in LAYOUTS.items():
        overrides = [*common, *layout, f"run.name={name}", f"collect.store_dir=store_{name}"]
        collect_out = _cli(root, "collect", str(config), *overrides, "--no-progress")
        train_out = _cli(root, "train", str(config), *overrides)
        eval_out = _cli(root, "eval", str(config), *overrides)
        runs[name] = {"dir": root / "runs" / name, "store": root / f"store_{name}", "collect": collect_out,
                      "train": train_out, "eval": eval_out}
    report_out = _cli(root, "report", *(str(r["dir"]) for r in runs.values()), "--out", str(root / "report"),
                      nproc=1)
    return {"root": root, "runs": runs, "report_dir": root / "report", "report_out": report_out}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_train_writes_its_run_dir(pipeline, name):
    run = pipeline["runs"][name]
    metrics = list(layout_of_run.read_jsonl(run["dir"] / layout_of_run.METRICS))
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and 0 <= r["clip_rate"] <= 1 for r in metrics)
    assert all(r["k_mean"] >= 1 for r in metrics)  # replay runs log |S_t|
    summary = json.loads((run["dir"] / layout_of_run.SUMMARY).read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["final_loss"] == metrics[-1]["loss"]
    evals = list(layout_of_run.read_jsonl(run["dir"] / layout_of_run.EVAL_METRICS))
    assert [r["step"] for r in evals] == [3, 6] and all(math.isfinite(r["perplexity"]) for r in evals)
    assert (run["dir"] / "checkpoints" / "latest").read_text().strip() == "iter_0000006"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_eval_matches_transformers_on_the_exported_and_base_weights(pipeline, name):
    run, root = pipeline["runs"][name], pipeline["root"]
    heldout = TokenDataset(root / "heldout")
    result = json.loads((run["dir"] / layout_of_run.EVAL).read_text())
    ft_loss, base_loss = _hf_loss(run["dir"] / "hf", heldout), _hf_loss(root / "hf_base", heldout)
    assert math.log(result["finetuned"]["perplexity"]) == pytest.approx(ft_loss, rel=1e-5)
    assert math.log(result["base"]["perplexity"]) == pytest.approx(base_loss, rel=1e-5)
    # the end-of-training perplexity logged by train is the same quantity on the same weights
    last = list(layout_of_run.read_jsonl(run["dir"] / layout_of_run.EVAL_METRICS))[-1]
    assert last["perplexity"] == pytest.approx(result["finetuned"]["perplexity"], rel=1e-6)
    assert 0 < result["relative_l2"] < 1


def test_report_puts_the_runs_side_by_side(pipeline):
    out = pipeline["report_dir"]
    report = json.loads((out / "report.json").read_text())
    rows = {Path(r["run_dir"]).name: r for r in report["runs"]}
    assert set(rows) == set(LAYOUTS)
    for name, run in pipeline["runs"].items():
        summary = json.loads((run["dir"] / layout_of_run.SUMMARY).read_text())
        evaluated = json.loads((run["dir"] / layout_of_run.EVAL).read_text())
        assert rows[name]["final_loss"] == pytest.approx(summary["final_loss"])
        assert rows[name]["relative_l2"] == pytest.approx(evaluated["relative_l2"])
    table = (out / "report.md").read_text()
    assert all(name in table for name in LAYOUTS)
    assert {"loss.png", "grad_norm.png"} <= {p.name for p in (out / "plots").glob("*.png")}
