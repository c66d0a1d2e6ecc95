"""`train` as a run (issue 6 items 5 and 7): exact resume, resume at another TP, faults, refusals.

One spawned single-rank job trains the same tiny replay + MoClip config several ways; references are the
uninterrupted run's metrics.jsonl (loss, grad norm, MoClip cos(phi) and clip rate: equal exactly after a
crash-and-resume on the same layout, 1e-5 after a resume at TP2) and its final weights (exactly equal).
"""
from __future__ import annotations

import contextlib
import os
import signal

import pytest
import torch

from replay_megatron.config import ConfigError, load_config
from replay_megatron.platform.spawn import run_local
from replay_megatron import run_dir as layout_of_run
from train_fixtures import training_root_with_stores

pytestmark = pytest.mark.mcore_compat  # CI also runs these on megatron-core 0.12.1 (README)


CURVE_KEYS = ("loss", "grad_norm", "cos_phi", "clip_rate", "lr", "consumed_samples", "skipped")


@contextlib.contextmanager
def _nan_loss_on_steps(steps: set[int]):
    """The replay loss (and so every gradient) is NaN on these optimizer steps (1-based)."""
    from replay_megatron.training import objectives, step

    original_loss, original_step = objectives.RestrictedCE.loss, step.train_step
    current = {"step": 0}

    def loss(self, output, micro_batch):
        loss_sum, count, logs = original_loss(self, output, micro_batch)
        if current["step"] not in steps:
            return loss_sum, count, logs
        return loss_sum * float("nan"), count, {k: torch.stack([v[0] * float("nan"), v[1]]) for k, v in logs.items()}

    def train_step(*args, **kwargs):
        current["step"] += 1
        return original_step(*args, **kwargs)

    objectives.RestrictedCE.loss, step.train_step = loss, train_step
    try:
        yield
    finally:
        objectives.RestrictedCE.loss, step.train_step = original_loss, original_step


@contextlib.contextmanager
def _sigterm_after_step(k: int):
    """SIGTERM arrives (from outside, as a scheduler's preemption) during optimizer step k."""
    from replay_megatron.training import step

    original, calls = step.train_step, {"n": 0}

    def train_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    step.train_step = train_step
    try:
        yield
    finally:
        step.train_step = original


def _final_weights(cfg) -> list[torch.Tensor] | None:
    """The run's final weights loaded into a fresh TP1 model (single-rank jobs only)."""
    from replay_megatron.config import model_hf_config
    from replay_megatron.models.checkpoint import load_megatron
    from replay_megatron.models.qwen3 import build_model, transformer_config
    from replay_megatron.platform.distributed import initialize, shutdown

    hf = model_hf_config(cfg)
    initialize(device="cpu")
    try:
        model = build_model(hf, transformer_config(hf), pre_process=True, post_process=True)
        load_megatron(model, layout_of_run.checkpoint_model_dir(cfg.run_dir), hf)
        return [p.detach().clone() for p in model.parameters()]
    finally:
        shutdown()


def train_job(config_path: str, runs: list[tuple[list[str], dict]]) -> list[dict]:
    """On each rank, one `train` per (overrides, options); options: stop_after_steps, nan_steps, sigterm_step,
    weights (load the final weights afterwards). Returns per run: summary or error, metrics, weights."""
    from replay_megatron.platform.distributed import shutdown
    from replay_megatron.training.faults import TrainingAborted
    from replay_megatron.runs.train import train

    world = int(os.environ["WORLD_SIZE"])
    out = []
    for overrides, options in runs:
        cfg = load_config(config_path, overrides, world_size=world)
        fault = (_nan_loss_on_steps(set(options["nan_steps"])) if "nan_steps" in options
                 else _sigterm_after_step(options["sigterm_step"]) if "sigterm_step" in options
                 else contextlib.nullcontext())
        result: dict = {}
        try:
            with fault:
                result["summary"] = train(cfg, world_size=world, stop_after_steps=options.get("stop_after_steps"))
        except TrainingAborted as e:
            result["aborted"] = str(e)
        finally:
            shutdown()
        metrics = cfg.run_dir / layout_of_run.METRICS
        result["metrics"] = list(layout_of_run.read_jsonl(metrics)) if metrics.exists() else []
        result["checkpoints"] = sorted(p.name for p in (cfg.run_dir / "checkpoints").glob("iter_*"))
        if options.get("weights"):
            result["weights"] = _final_weights(cfg)
        out.append(result)
    return out


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> str:
    """The run's store, and one with teacher logits (fp32) for the KL term."""
    return training_root_with_stores(tmp_path_factory.mktemp("train"), [],
                                     ["collect.store_dir=store_kl", "collect.store_logits=fp32"])


# a small cap makes MoClip clip on most steps, so a resume that lost its running clip counts shows in clip_rate
CLIPPING = ["optimizer.max_angle=5"]


MUON_RUNS = {"adamuon": ["optimizer.name=adamuon", "model.params_dtype=bf16", "optimizer.lr=1e-3"],
             "muonclip": ["optimizer.name=muonclip", "optimizer.attention_clip_grad=0.1", "optimizer.lr=1e-3"]}


def _curve(metrics: list[dict]) -> list[tuple]:
    return [tuple(r.get(k) for k in CURVE_KEYS) for r in metrics]


@pytest.fixture(scope="module")
def single_rank_runs(config_path) -> dict[str, dict]:
    eval_off = ["data.eval=null", *CLIPPING]
    runs = {
        "uninterrupted": (["run.name=uninterrupted", *eval_off], {"weights": True}),
        "crashed": (["run.name=crashed", *eval_off], {"stop_after_steps": 4}),
        "resumed": (["run.name=crashed", *eval_off], {"weights": True}),
        "sigterm": (["run.name=sigterm", *eval_off], {"sigterm_step": 2}),
        "after_sigterm": (["run.name=sigterm", *eval_off], {}),
        "nan": (["run.name=nan", *eval_off], {"nan_steps": [2]}),
        "abort": (["run.name=abort", *eval_off, "train.max_consecutive_nonfinite=2"], {"nan_steps": [2, 3, 4]}),
        "layout_tp1": (["run.name=layout", *eval_off], {"stop_after_steps": 4}),
        "kl": (["run.name=kl", *eval_off, "collect.store_dir=store_kl", "collect.store_logits=fp32",
                "train.kl_weight=0.5", "train.train_iters=2"], {}),
        # bf16 weights: megatron's Float16Optimizer checkpoints (every parameter must be bf16, norms too)
        "bf16": (["run.name=bf16", *eval_off, "model.params_dtype=bf16"], {"weights": True}),
        "bf16_crashed": (["run.name=bf16_crashed", *eval_off, "model.params_dtype=bf16"], {"stop_after_steps": 4}),
        "bf16_resumed": (["run.name=bf16_crashed", *eval_off, "model.params_dtype=bf16"], {"weights": True}),
    }
    from replay_megatron.mcore_compat import muon_unavailable_reason

    if muon_unavailable_reason() is None:  # megatron's Muon stack: AdaMuon in bf16, MuonClip in fp32
        for name, overrides in MUON_RUNS.items():
            runs[name] = ([f"run.name={name}", "data.eval=null", *overrides], {"weights": True})
            runs[f"{name}_crashed"] = ([f"run.name={name}_crashed", "data.eval=null", *overrides],
                                       {"stop_after_steps": 4})
            runs[f"{name}_resumed"] = ([f"run.name={name}_crashed", "data.eval=null", *overrides], {"weights": True})
    [results] = run_local(train_job, 1, config_path, list(runs.values()))
    return dict(zip(runs, results))


@pytest.mark.multiproc
def test_crash_and_resume_reproduce_the_uninterrupted_run_exactly(single_rank_runs):
    ref, resumed = single_rank_runs["uninterrupted"], single_rank_runs["resumed"]
    assert ref["summary"]["status"] == "completed" and len(ref["metrics"]) == 6
    # the crash after step 4 left metrics of step 4 but only the step-3 checkpoint: step 4 is redone
    assert len(single_rank_runs["crashed"]["metrics"]) == 4
    assert single_rank_runs["crashed"]["checkpoints"] == ["iter_0000000", "iter_0000003"]
    assert 0 < ref["metrics"][2]["clip_rate"] < 1  # clipped before the step-3 checkpoint, not on step 1
    assert _curve(resumed["metrics"]) == _curve(ref["metrics"])
    assert all(torch.equal(a, b) for a, b in zip(resumed["weights"], ref["weights"]))
    assert resumed["summary"]["stability"] == ref["summary"]["stability"]


@pytest.mark.multiproc
def test_tokens_per_second_counts_real_tokens_only(config_path, single_rank_runs):
    from pathlib import Path

    from replay_megatron.data.dataset import train_micro_batches
    from replay_megatron.data.token_store import TokenDataset

    ds = TokenDataset(Path(config_path).parent / "tokens")
    g, seq = 4, ds.seq_length
    for r in single_rank_runs["uninterrupted"]["metrics"]:
        rows = next(train_micro_batches(len(ds), g, 1, 0, seed=7, consumed_samples=(r["step"] - 1) * g))
        real = sum(min(ds.lengths[i] - 1, seq) for i in rows)
        assert 0 < real < g * seq
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(real)
        assert r["padding_fraction"] == pytest.approx(1 - real / (g * seq))



@pytest.mark.multiproc
def test_bf16_weights_checkpoint_and_resume_exactly(single_rank_runs):
    ref, resumed = single_rank_runs["bf16"], single_rank_runs["bf16_resumed"]
    assert ref["summary"]["status"] == "completed" and len(ref["metrics"]) == 6
    assert _curve(resumed["metrics"]) == _curve(ref["metrics"])
    assert all(torch.equal(a, b) for a, b in zip(resumed["weights"], ref["weights"]))


@pytest.mark.multiproc
@pytest.mark.parametrize("name", list(MUON_RUNS))
def test_muon_family_checkpoint_and_resume_exactly(single_rank_runs, name):
    from replay_megatron.mcore_compat import MCORE_VERSION, MUON_MIN_VERSION

    if MCORE_VERSION < MUON_MIN_VERSION:
        pytest.skip(f"megatron-core {MCORE_VERSION} has no Muon (its refusal: test_refusals_name_the_field)")
    ref, resumed = single_rank_runs[name], single_rank_runs[f"{name}_resumed"]
    assert ref["summary"]["status"] == "completed" and len(ref["metrics"]) == 6
    assert single_rank_runs[f"{name}_crashed"]["checkpoints"] == ["iter_0000000", "iter_0000003"]
    assert _curve(resumed["metrics"]) == _curve(ref["metrics"])
    assert all(torch.equal(a, b) for a, b in zip(resumed["weights"], ref["weights"]))
    if name == "muonclip":  # its attention gradient norm (before the clip) is logged every step
        assert all(r["attention_grad_norm"] > 0 for r in ref["metrics"])


@pytest.mark.multiproc
def test_sigterm_saves_a_checkpoint_and_the_rerun_continues_exactly(single_rank_runs):
    stopped = single_rank_runs["sigterm"]
    assert stopped["summary"]["status"] == "interrupted" and stopped["summary"]["steps"] == 2
    assert "iter_0000002" in stopped["checkpoints"]
    assert _curve(single_rank_runs["after_sigterm"]["metrics"]) == _curve(single_rank_runs["uninterrupted"]["metrics"])


@pytest.mark.multiproc
def test_a_nonfinite_step_is_skipped_and_counted(single_rank_runs):
    nan, ref = single_rank_runs["nan"], single_rank_runs["uninterrupted"]
    assert nan["summary"]["skipped_steps"] == 1 and nan["summary"]["steps"] == 6
    step2 = nan["metrics"][1]
    assert step2["skipped"] is True and step2["loss"] is None and step2["grad_norm"] is None
    # the skipped step changed nothing: step 3 sees the weights after step 1, as the reference's step 2 did
    # (same weights, other data), so only the first step's numbers are shared exactly
    assert _curve(nan["metrics"][:1]) == _curve(ref["metrics"][:1])
    assert all(r["loss"] is not None for r in nan["metrics"][2:])


@pytest.mark.multiproc
def test_too_many_nonfinite_steps_abort_after_saving(single_rank_runs):
    abort = single_rank_runs["abort"]
    assert "2 non-finite steps in a row" in abort["aborted"] and "iter_0000003" in abort["aborted"]
    assert "iter_0000003" in abort["checkpoints"]


@pytest.mark.multiproc
def test_the_kl_term_vanishes_while_the_student_is_the_teacher(single_rank_runs):
    """Step 1 runs the Stage 0 weights: KL(teacher || student) = 0 and its gradient too, so steps 1 and 2
    see the same weights as the CE-only run; at step 2 the loss is CE + 0.5 * KL > CE."""
    kl, ref = single_rank_runs["kl"]["metrics"], single_rank_runs["uninterrupted"]["metrics"]
    assert kl[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-6)
    assert kl[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-5)
    assert 0 < kl[1]["loss"] - ref[1]["loss"] < 0.1 * ref[1]["loss"]


def resume_at_tp2_job(config_path: str) -> list[dict]:
    return train_job(config_path, [(["run.name=layout", "data.eval=null", *CLIPPING,
                                     "parallel.tensor_model_parallel_size=2"], {})])


@pytest.mark.multiproc
def test_resume_at_another_tensor_parallel_size_continues_the_curve(config_path, single_rank_runs):
    [result], _ = run_local(resume_at_tp2_job, 2, config_path)
    ref = single_rank_runs["uninterrupted"]["metrics"]
    got = result["metrics"]
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for mine, theirs in zip(got[3:], ref[3:]):  # steps after the TP1 -> TP2 resume
        for key in ("loss", "grad_norm", "cos_phi", "clip_rate"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)


def test_refusals_name_the_field(config_path, tmp_path):
    from replay_megatron.runs.train import preflight

    from replay_megatron.mcore_compat import MCORE_VERSION, MUON_MIN_VERSION, muon_unavailable_reason

    if MCORE_VERSION < MUON_MIN_VERSION:  # the 0.12.1 leg: refused by name before any work
        with pytest.raises(ConfigError, match=f"optimizer.name.*'adamuon' runs on megatron-core's Muon.*"
                                              f"megatron-core {MCORE_VERSION} has no Muon"):
            preflight(load_config(config_path, ["optimizer.name=adamuon"]), 1)
    else:  # README's environment carries emerging-optimizers: AdaMuon and MuonClip train
        assert muon_unavailable_reason() is None
    with pytest.raises(ConfigError, match="data.train"):
        preflight(load_config(config_path, ["data.train=missing_tokens"]), 1)
    other = tmp_path / "other_tokens"
    from train_fixtures import write_token_store

    write_token_store(other, 16, seed=5)  # same size, other tokens: another dataset fingerprint
    with pytest.raises(Exception, match="dataset"):
        preflight(load_config(config_path, [f"data.train={other}"]), 1)
    with pytest.raises(ConfigError, match="train.kl_weight.*stores none"):
        preflight(load_config(config_path, ["train.kl_weight=0.5"]), 1)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        preflight(load_config(config_path, ["train.train_iters=null", "train.epochs=1",
                                            "train.global_batch_size=32"]), 1)
