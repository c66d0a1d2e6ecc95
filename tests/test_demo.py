"""`replay-megatron demo`: the step runner's reuse rules (fast), and `demo --quick` end to end (multiproc):
the report's structure, every number finite and traced back to the file of the run that produced it, and a
second invocation reusing every step."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from replay_megatron.demo.pipeline import QUICK_METHODS, demo_steps
from replay_megatron.demo.runner import LEDGER, DemoError, Runner, Step
from replay_megatron.training import run_dir as layout_of_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


# --- the runner (one cheap subcommand, `plan`, stands in for the heavy ones) ------------------------------

def _plan_step(out: Path, config_content: str = "a", after: tuple[str, ...] = (), name: str = "plan") -> Step:
    marker = out / f"made_by_{name}"
    return Step(name, ("plan", str(CONFIGS / "pretrain.yaml"), "--world-size", "2"), outputs=(marker,),
                complete=marker.is_file, after=after, config_content=config_content)


def _run(out: Path, step: Step) -> str:
    stream = io.StringIO()
    Runner(out, stream).run(step, 1, 1)
    return stream.getvalue()


def test_runner_reuses_a_finished_step_and_reruns_when_its_key_changes(tmp_path):
    step = _plan_step(tmp_path)
    with pytest.raises(DemoError, match="outputs are incomplete"):
        _run(tmp_path, step)  # `plan` does not write the marker
    (tmp_path / "made_by_plan").write_text("x")
    first = _run(tmp_path, step)  # same key, not finished: run again over the outputs (resume)
    assert "verdict: OK" in first and "done in" in first and (tmp_path / "made_by_plan").is_file()
    assert json.loads((tmp_path / LEDGER).read_text())["plan"]["done"] is True
    assert "reused" in _run(tmp_path, step)
    with pytest.raises(DemoError, match="outputs are incomplete"):  # new config: outputs removed, then run
        _run(tmp_path, _plan_step(tmp_path, config_content="b"))
    assert not (tmp_path / "made_by_plan").exists()


def _finish(out: Path, step: Step) -> str:
    """Run `step` to completion: `plan` writes nothing, so the marker is made after its first (fresh) run."""
    try:
        return _run(out, step)
    except DemoError:
        (out / f"made_by_{step.name}").write_text("x")
        return _run(out, step)


def test_runner_reruns_the_steps_after_a_rerun_step(tmp_path):
    up, down = _plan_step(tmp_path), _plan_step(tmp_path, after=("plan",), name="after")
    _finish(tmp_path, up)
    _finish(tmp_path, down)
    assert "reused" in _run(tmp_path, down)
    (tmp_path / "made_by_plan").unlink()  # the upstream step's outputs are lost: it runs again ...
    assert "done in" in _finish(tmp_path, up)
    assert "done in" in _finish(tmp_path, down)  # ... and so does the step after it
    assert "reused" in _run(tmp_path, down)


def test_runner_names_the_failed_step_and_its_log(tmp_path):
    step = Step("bad", ("plan", str(tmp_path / "missing.yaml")), outputs=(), complete=lambda: True)
    with pytest.raises(DemoError, match=r"step bad failed \(exit code 2\); log: .*bad\.log"):
        _run(tmp_path, step)
    assert "missing.yaml" in (tmp_path / "logs" / "bad.log").read_text()


def test_runner_names_an_unreadable_ledger(tmp_path):
    (tmp_path / LEDGER).write_text("{truncated")
    with pytest.raises(DemoError, match=f"{tmp_path / LEDGER}: unreadable .*delete it"):
        Runner(tmp_path)


def test_runner_refuses_outputs_outside_its_dir_and_unrun_upstream_steps(tmp_path):
    outside = Step("x", ("plan", "--help"), outputs=(tmp_path.parent / "elsewhere",), complete=lambda: True)
    with pytest.raises(DemoError, match="outside"):
        _run(tmp_path / "out", outside)
    with pytest.raises(DemoError, match="needs step data"):
        _run(tmp_path, _plan_step(tmp_path, after=("data",)))


def test_demo_steps_chain_every_stage_through_the_cli():
    out = Path("/tmp/demo-steps")
    steps = demo_steps(out, quick=True)
    commands = [s.command[0] for s in steps]
    assert commands == ["make-demo-data", "make-demo-data", "preprocess", "preprocess", "train", "preprocess", "train",
                        "collect", "train", "eval", "eval", "report"]
    by_name = {s.name: s for s in steps}
    assert "collect-domain_topk" in by_name["train-topk_moclip"].after
    assert "collect-domain_topk" not in by_name["train-sft_adamw"].after
    base = next(a for a in by_name["train-sft_adamw"].command if a.startswith("model.mcore_checkpoint="))
    assert base.endswith("runs/demo/pretrain/checkpoints/iter_0000016/model")
    assert all(s.ranks == 2 for s in steps if s.command[0] in ("train", "collect", "eval"))
    full = demo_steps(out)
    assert len([s for s in full if s.command[0] == "train"]) == 5  # base + the four methods


def test_the_collect_step_reruns_only_when_what_collect_reads_changes():
    from replay_megatron.config import load_config
    from replay_megatron.demo.pipeline import collect_step_inputs

    def key(*overrides):
        return collect_step_inputs(load_config(CONFIGS / "topk_moclip.yaml", list(overrides)))

    assert key() == key("optimizer.lr=2e-3", "train.train_iters=3")  # the store stays
    assert key() != key("collect.tau=0.9") and key() != key("run.seed=7")


# --- demo --quick, end to end ----------------------------------------------------------------------------

def _demo(out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "replay_megatron", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, _demo(out).stdout


# Numbers every run has; the Stage 0 ones only replay runs have.
EVERY_RUN = ("steps", "final_loss", "loss_std", "grad_norm_cv", "spike_count", "median_step_time_s",
             "tokens_per_s", "perplexity_change", "perplexity_change_rel", "relative_l2", "domain_accuracy")
REPLAY_ONLY = ("stage0_time_s", "storage_bytes_per_position", "storage_fraction_of_fp16_logits", "k_median")


@pytest.mark.multiproc
def test_quick_demo_report_is_complete_and_finite(quick_demo):
    out, stdout = quick_demo
    report = json.loads((out / "report" / "report.json").read_text())
    rows = {r["name"]: r for r in report["runs"]}
    assert sorted(rows) == sorted(f"demo/{m}" for m in QUICK_METHODS)
    for name, row in rows.items():
        replay = row["method"].startswith("replay")
        for key in EVERY_RUN + (REPLAY_ONLY if replay else ()):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (name, key, row[key])
        assert all(row[key] is None for key in (() if replay else REPLAY_ONLY)), name
        assert 0 <= row["domain_accuracy"] <= 1 and row["relative_l2"] > 0
    assert rows["demo/topk_moclip"]["method"] == "replay + moclip"
    assert rows["demo/sft_adamw"]["method"] == "full + adamw"
    for plot in report["plots"]:
        assert (out / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "report" / "report.md").read_text().split("\n\n")[1]
    assert table in stdout and str(out / "report" / "report.md") in stdout


@pytest.mark.multiproc
def test_quick_demo_numbers_are_the_runs_own(quick_demo):
    """Each number in the report is the one its run wrote (not a constant): losses and step times from
    metrics.jsonl, forgetting and accuracy from eval.json, Stage 0 from the store's own record."""
    out, _ = quick_demo
    rows = {r["name"]: r for r in json.loads((out / "report" / "report.json").read_text())["runs"]}
    losses = set()
    for name, row in rows.items():
        run = out / "runs" / name
        metrics = list(layout_of_run.read_jsonl(run / layout_of_run.METRICS))
        evaluation = json.loads((run / layout_of_run.EVAL).read_text())
        assert row["final_loss"] == pytest.approx(metrics[-1]["loss"])
        assert row["steps"] == metrics[-1]["step"]
        assert row["relative_l2"] == evaluation["relative_l2"]
        assert row["perplexity_change"] == evaluation["perplexity_change"]
        assert row["domain_accuracy"] == evaluation["domain"]["accuracy"]
        losses.add(row["final_loss"])
    assert len(losses) == len(rows), "every method trained its own weights"
    store = out / "stores" / "domain_topk"
    recorded = json.loads((store / "collect_timing.json").read_text())
    assert rows["demo/topk_moclip"]["stage0_time_s"] == pytest.approx(recorded["wall_s"])


@pytest.mark.multiproc
def test_quick_demo_second_invocation_reuses_every_step(quick_demo):
    out, _ = quick_demo
    before = (out / "report" / "report.json").read_text()
    stdout = _demo(out).stdout
    step_lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert step_lines and all("reused" in line for line in step_lines), step_lines
    assert (out / "report" / "report.json").read_text() == before


@pytest.mark.multiproc
def test_quick_demo_numbers_change_with_the_seed(quick_demo, tmp_path):
    """Another run.seed (initialisation, data order) gives other losses, distances and perplexities."""
    out, _ = quick_demo
    other = tmp_path / "seed7"
    proc = subprocess.run([sys.executable, "-m", "replay_megatron", "demo", "--quick", "--seed", "7", "--out",
                           str(other)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows, rows7 = ({r["name"]: r for r in json.loads((d / "report" / "report.json").read_text())["runs"]}
                   for d in (out, other))
    for name, row in rows.items():
        for key in ("final_loss", "loss_std", "relative_l2", "perplexity_change"):
            assert row[key] != rows7[name][key], (name, key)
