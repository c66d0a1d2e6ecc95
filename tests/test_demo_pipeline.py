"""`replay-megatron demo`: the step runner's reuse rules and the steps of methods x seeds (fast), and
`demo --quick --seeds 2` end to end (multiproc): the report's structure (the base's column, one column per
method with mean ± std over its seeds), every number finite and traced back to the file of the run that
produced it, and a second invocation reusing every step."""
from __future__ import annotations

import io
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from replay_megatron.demo.pipeline import QUICK_METHODS, demo_steps
from replay_megatron.demo.runner import LEDGER, DemoError, Runner, Step
from replay_megatron import run_dir as layout_of_run

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
    assert commands == ["make-demo-data", "make-demo-data", "preprocess", "preprocess", "train", "eval", "preprocess",
                        "train", "collect", "train", "eval", "eval", "report"]
    by_name = {s.name: s for s in steps}
    assert "collect-domain_topk" in by_name["train-topk_moclip"].after
    assert "collect-domain_topk" not in by_name["train-sft_adamw"].after
    base = next(a for a in by_name["train-sft_adamw"].command if a.startswith("model.mcore_checkpoint="))
    assert base.endswith("runs/demo/pretrain/checkpoints/iter_0000016/model")
    assert by_name["eval-pretrain"].command[:2] == ("eval", str(CONFIGS / "pretrain.yaml"))
    assert by_name["report"].command[1:3] == ("--base", str(out / "runs" / "demo" / "pretrain"))
    assert all(s.ranks == 2 for s in steps if s.command[0] in ("train", "collect", "eval"))
    full = demo_steps(out)
    assert len([s for s in full if s.command[0] == "train"]) == 5  # base + the four methods


def test_demo_seeds_repeat_the_comparison_runs_over_one_base_and_one_store():
    """--seeds 3: each method's run with its config's seed stays where one seed puts it (reused by a re-run
    with more seeds); seeds +1, +2 train into runs/seed<seed> on the same store; the report has them all."""
    from replay_megatron.config import load_config

    out = Path("/tmp/demo-steps")
    steps = demo_steps(out, quick=True, seeds=3, methods=["topk_moclip", "topk_moclip_rotate"])
    one_seed = {s.name: s for s in demo_steps(out, quick=True, methods=["topk_moclip", "topk_moclip_rotate"])}
    by_name = {s.name: s for s in steps}
    seed = load_config(CONFIGS / "topk_moclip.yaml").run.seed
    trains = [s.name for s in steps if s.command[0] == "train"]
    assert trains == ["pretrain", "train-topk_moclip", f"train-topk_moclip-seed{seed + 1}",
                      f"train-topk_moclip-seed{seed + 2}", "train-topk_moclip_rotate",
                      f"train-topk_moclip_rotate-seed{seed + 1}", f"train-topk_moclip_rotate-seed{seed + 2}"]
    assert [s.name for s in steps if s.command[0] == "collect"] == ["collect-domain_topk"]
    for name in ("train-topk_moclip", "collect-domain_topk"):  # what the runner's key is made of
        same = [(s.command, s.outputs, s.after, s.config_content) for s in (by_name[name], one_seed[name])]
        assert same[0] == same[1], name
    again = by_name[f"train-topk_moclip-seed{seed + 2}"]
    assert again.command[-2:] == (f"run.seed={seed + 2}", f"run.out_dir={out / 'runs' / f'seed{seed + 2}'}")
    assert "collect-domain_topk" in again.after
    assert by_name[f"eval-topk_moclip-seed{seed + 2}"].command[1:] == again.command[1:]
    report = by_name["report"].command
    assert str(out / "runs" / f"seed{seed + 1}" / "demo" / "topk_moclip_rotate") in report
    assert len(report) == 3 + 6 + 2 and len(by_name["report"].after) == 7  # --base B, six runs, --out O


def test_demo_refuses_unknown_methods_and_no_seeds():
    with pytest.raises(ValueError, match="methods must be distinct names from sft_adamw.*got methods sft_adamw, sgd"):
        demo_steps(Path("/tmp/demo-steps"), methods=["sft_adamw", "sgd"])
    with pytest.raises(ValueError, match="seeds 0"):
        demo_steps(Path("/tmp/demo-steps"), seeds=0)


def test_the_collect_step_reruns_only_when_what_collect_reads_changes():
    from replay_megatron.config import load_config
    from replay_megatron.demo.pipeline import collect_step_inputs

    def key(*overrides):
        return collect_step_inputs(load_config(CONFIGS / "topk_moclip.yaml", list(overrides)))

    assert key() == key("optimizer.lr=2e-3", "train.train_iters=3")  # the store stays
    assert key() != key("collect.tau=0.9") and key() != key("run.seed=7")


# --- demo --quick, end to end ----------------------------------------------------------------------------

SEEDS = 2  # the quick demo repeats each method once more: the report's mean ± std over real runs


def _demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "replay_megatron", "demo", "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, _demo(out, "--seeds", str(SEEDS)).stdout


def _rows(out: Path) -> dict[str, dict]:
    """report.json's per-run rows by run name (with seeds: "<name> seed <seed>")."""
    return {r["name"]: r for r in json.loads((out / "report" / "report.json").read_text())["runs"]}


# Numbers every run has; the Stage 0 ones only replay runs have.
EVERY_RUN = ("steps", "final_loss", "loss_std", "grad_norm_cv", "spike_count", "median_step_time_s",
             "tokens_per_s", "perplexity", "perplexity_change", "perplexity_change_rel", "relative_l2",
             "domain_accuracy")
REPLAY_ONLY = ("stage0_time_s", "storage_bytes_per_position", "storage_fraction_of_fp16_logits", "k_median")


@pytest.mark.multiproc
def test_quick_demo_report_is_complete_and_finite(quick_demo):
    out, stdout = quick_demo
    report = json.loads((out / "report" / "report.json").read_text())
    seed = report["runs"][0]["seed"]
    rows = _rows(out)
    assert sorted(rows) == sorted(f"demo/{m} seed {seed + i}" for m in QUICK_METHODS for i in range(SEEDS))
    for name, row in rows.items():
        replay = row["method"].startswith("replay")
        for key in EVERY_RUN + (REPLAY_ONLY if replay else ()):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (name, key, row[key])
        assert all(row[key] is None for key in (() if replay else REPLAY_ONLY)), name
        assert 0 <= row["domain_accuracy"] <= 1 and row["relative_l2"] > 0
    assert rows[f"demo/topk_moclip seed {seed}"]["method"] == "replay + moclip"
    assert rows[f"demo/sft_adamw seed {seed}"]["method"] == "full + adamw"
    base = report["base"]
    assert math.isfinite(base["perplexity"]) and base["perplexity"] > 1 and 0 <= base["domain_accuracy"] <= 1
    assert not report["notes"], report["notes"]  # every run's eval saw the base column's perplexity
    for plot in report["plots"]:
        assert (out / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "report" / "report.md").read_text().split("\n\n")[1]
    assert table in stdout and str(out / "report" / "report.md") in stdout
    lines = table.splitlines()
    assert lines[0] == "| metric | base | " + " | ".join(f"demo/{m} (n={SEEDS})" for m in QUICK_METHODS) + " |"
    assert next(line for line in lines if line.startswith("| general perplexity")).split(" | ")[1] == \
        f"{base['perplexity']:.4f}"


@pytest.mark.multiproc
def test_quick_demo_columns_are_mean_and_std_over_the_seeds_runs(quick_demo):
    """A method's column: mean and sample std of its seeds' own rows, which differ (data order) but share
    the base and the Stage 0 store."""
    out, _ = quick_demo
    report = json.loads((out / "report" / "report.json").read_text())
    rows = {r["run_dir"]: r for r in report["runs"]}
    assert [c["name"] for c in report["columns"]] == [f"demo/{m}" for m in QUICK_METHODS]
    for column in report["columns"]:
        runs = [rows[d] for d in column["run_dirs"]]
        assert len(runs) == SEEDS and len(set(column["seeds"])) == SEEDS
        for key in ("final_loss", "perplexity", "relative_l2"):
            values = [r[key] for r in runs]
            assert len(set(values)) == SEEDS, (column["name"], key, values)
            assert column["mean"][key] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert column["std"][key] == pytest.approx(statistics.stdev(values), rel=1e-12)
        assert len({r["base_perplexity"] for r in runs}) == 1
    topk = report["columns"][QUICK_METHODS.index("topk_moclip")]
    assert topk["std"]["stage0_time_s"] is None and topk["mean"]["stage0_time_s"] is not None  # one store


@pytest.mark.multiproc
def test_quick_demo_numbers_are_the_runs_own(quick_demo):
    """Each number in the report is the one its run wrote (not a constant): losses and step times from
    metrics.jsonl, forgetting and accuracy from eval.json, Stage 0 from the store's own record; the base's
    from the eval of the pre-training run, whose weights every run's eval took as its base."""
    out, _ = quick_demo
    report = json.loads((out / "report" / "report.json").read_text())
    base_eval = json.loads((out / "runs" / "demo" / "pretrain" / layout_of_run.EVAL).read_text())
    assert report["base"]["perplexity"] == base_eval["finetuned"]["perplexity"]
    assert report["base"]["domain_accuracy"] == base_eval["domain"]["accuracy"]
    losses = set()
    for row in report["runs"]:
        run = Path(row["run_dir"])
        metrics = list(layout_of_run.read_jsonl(run / layout_of_run.METRICS))
        evaluation = json.loads((run / layout_of_run.EVAL).read_text())
        assert row["final_loss"] == pytest.approx(metrics[-1]["loss"])
        assert row["steps"] == metrics[-1]["step"]
        assert row["relative_l2"] == evaluation["relative_l2"]
        assert row["perplexity_change"] == evaluation["perplexity_change"]
        assert row["domain_accuracy"] == evaluation["domain"]["accuracy"]
        assert row["perplexity"] == evaluation["finetuned"]["perplexity"] != report["base"]["perplexity"]
        assert evaluation["base_weights"] == base_eval["checkpoint"] + "/model"
        assert evaluation["base"]["perplexity"] == report["base"]["perplexity"]
        losses.add(row["final_loss"])
    assert len(losses) == len(report["runs"]), "every method and seed trained its own weights"
    store = out / "stores" / "domain_topk"
    recorded = json.loads((store / "collect_timing.json").read_text())
    for row in report["runs"]:
        if row["method"].startswith("replay"):
            assert row["stage0_time_s"] == pytest.approx(recorded["wall_s"])


@pytest.mark.multiproc
def test_quick_demo_second_invocation_reuses_every_step(quick_demo):
    out, _ = quick_demo
    before = (out / "report" / "report.json").read_text()
    stdout = _demo(out, "--seeds", str(SEEDS)).stdout
    step_lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert step_lines and all("reused" in line for line in step_lines), step_lines
    assert (out / "report" / "report.json").read_text() == before


@pytest.mark.multiproc
def test_quick_demo_numbers_change_with_the_seed(quick_demo, tmp_path):
    """Another run.seed for everything (the base's initialisation included, and data order) gives other
    losses, distances and perplexities."""
    out, _ = quick_demo
    other = tmp_path / "seed7"
    _demo(other, "--seed", "7")
    rows, rows7 = _rows(out), _rows(other)
    seed = json.loads((out / "report" / "report.json").read_text())["runs"][0]["seed"]
    for name, row in rows7.items():
        for key in ("final_loss", "loss_std", "relative_l2", "perplexity_change"):
            assert row[key] != rows[f"{name} seed {seed}"][key], (name, key)
