"""Config system: extends composition, overrides, defaults, model resolution, resolved config and fingerprint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from replay_megatron.config import (ConfigError, check_resume, config_fingerprint, load_config, load_resolved,
                                    model_hf_config, save_resolved, validate_config)
from replay_megatron.config.loader import compose
from replay_megatron.models.presets import preset

TINY = "model: {preset: qwen3-tiny, params_dtype: fp32}\ndata: {seq_length: 64}\ntrain: {loss: full, global_batch_size: 4}\n"


def write(dir_: Path, files: dict[str, str]) -> Path:
    """Write `files` (name -> YAML text) under `dir_`; returns the path of the first one."""
    for name, text in files.items():
        (dir_ / name).parent.mkdir(parents=True, exist_ok=True)
        (dir_ / name).write_text(text)
    return dir_ / next(iter(files))


def test_extends_deep_merges_child_over_bases_in_order(tmp_path):
    top = write(tmp_path, {
        "runs/top.yaml": "extends: [../base/a.yaml, ../base/b.yaml]\noptimizer: {lr: 3.0e-6}\n",
        "base/a.yaml": "extends: common.yaml\noptimizer: {name: adamw, lr: 1.0e-6, max_angle: 30}\n",
        "base/b.yaml": "optimizer: {name: tam}\ncollect: {positions: {strategy: last}}\n",
        "base/common.yaml": TINY + "collect: {positions: {strategy: random, buckets: 3}}\n",
    })
    cfg = load_config(top)
    assert cfg.optimizer.name == "tam"            # b (later base) wins over a
    assert cfg.optimizer.lr == 3e-6               # the file itself wins over its bases
    assert cfg.optimizer.max_angle == 30          # untouched keys of a base survive the merge
    assert cfg.collect.positions.strategy == "last"
    assert cfg.collect.positions.buckets == 3     # deep merge: sibling keys of a nested mapping survive
    _, origin, header = compose(top)
    assert origin["optimizer.name"].endswith("b.yaml") and origin["optimizer.lr"].endswith("top.yaml")
    assert origin["collect.positions.buckets"].endswith("common.yaml")
    assert "top.yaml extends" in header and "a.yaml extends" in header


def test_null_in_child_replaces_a_base_value(tmp_path):
    top = write(tmp_path, {"top.yaml": "extends: base.yaml\ntrain: {epochs: null, train_iters: 7}\n",
                           "base.yaml": TINY.replace("loss: full", "loss: full, epochs: 2")})
    cfg = load_config(top)
    assert (cfg.train.epochs, cfg.train.train_iters) == (None, 7)


def test_overrides_are_yaml_parsed_and_win(tmp_path):
    top = write(tmp_path, {"c.yaml": TINY})
    cfg = load_config(top, ["optimizer.lr=2e-6", "optimizer.betas=[0.8, 0.9]", "train.save_interval=5",
                            "logging.tensorboard=false", "collect.positions.amount=64", "eval.max_batches=",
                            "model.overrides.vocab_size=1000", "run.name=a/b"])
    assert cfg.optimizer.lr == 2e-6 and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.train.save_interval == 5 and cfg.logging.tensorboard is False and cfg.eval.max_batches is None
    assert cfg.collect.positions.amount == 64 and isinstance(cfg.collect.positions.amount, int)
    assert model_hf_config(cfg)["vocab_size"] == 1000
    assert cfg.run_dir == Path("runs/a/b")


def test_defaults_follow_the_paper_and_fill_derived_values(tmp_path):
    cfg = load_config(write(tmp_path, {"c.yaml": "model: {preset: qwen3-tiny}\ndata: {seq_length: 64}\n"
                                                 "collect: {store_dir: s}\n"}))
    assert (cfg.collect.tau, cfg.collect.k_max, cfg.collect.positions.strategy, cfg.collect.positions.buckets) \
        == (0.95, 200, "bucket", 5)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.max_angle, cfg.optimizer.betas) \
        == ("moclip", 1.25e-6, 45.0, (0.9, 0.999))
    assert (cfg.train.global_batch_size, cfg.train.epochs, cfg.train.kl_weight) == (16, 1, 0.0)
    assert cfg.train.replay_store == "s"          # Stage 1 reads what Stage 0 wrote
    atan2 = load_config(write(tmp_path, {"d.yaml": TINY}), ["optimizer.name=adam_atan2"])
    assert atan2.optimizer.max_angle == 180.0     # Adam-atan2 = MoClip without clipping (SPEC 4)


def test_input_paths_resolve_under_data_root(tmp_path):
    cfg = load_config(write(tmp_path, {"c.yaml": TINY}), [f"run.data_root={tmp_path}", "data.train=tok/train",
                                                          "data.eval=/abs/heldout"])
    assert cfg.input_path(cfg.data.train) == tmp_path / "tok/train"
    assert cfg.input_path(cfg.data.eval) == Path("/abs/heldout")
    assert cfg.input_path(None) is None


def test_model_hf_config_from_checkpoint_dir(tmp_path):
    ckpt = tmp_path / "hf" / "tiny"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(preset("qwen3-tiny")))
    cfg = load_config(write(tmp_path, {"c.yaml": TINY}),
                      ["model.preset=null", "model.hf_path=hf/tiny", f"run.data_root={tmp_path}",
                       "model.overrides={num_hidden_layers: 2}"])
    assert model_hf_config(cfg) == {**preset("qwen3-tiny"), "num_hidden_layers": 2}
    assert model_hf_config(load_config(tmp_path / "c.yaml")) == preset("qwen3-tiny")


def test_world_size_checks_at_load_and_later(tmp_path):
    path = write(tmp_path, {"c.yaml": TINY + "parallel: {tensor_model_parallel_size: 2}\n"})
    load_config(path, world_size=4)                              # DP 2: 4 % (1 x 2) == 0
    with pytest.raises(ConfigError, match=r"micro_batch_size x DP = 1 x 8 = 8"):
        load_config(path, world_size=16)
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by TP x PP = 2 x 1 = 2"):
        validate_config(cfg, world_size=3)


def test_resolved_config_round_trips_with_its_fingerprint(tmp_path):
    cfg = load_config(write(tmp_path, {"c.yaml": TINY}), ["optimizer.lr=2e-6", "model.overrides={vocab_size: 640}"])
    path = save_resolved(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "resolved.yaml"
    assert [p.name for p in path.parent.iterdir()] == ["resolved.yaml"]      # no temp file left behind
    assert f"# config fingerprint: {config_fingerprint(cfg)}" in path.read_text()
    again = load_resolved(path.parent)
    assert again == cfg and config_fingerprint(again) == config_fingerprint(cfg)
    # The resolved file is itself a loadable config giving the same fingerprint.
    assert config_fingerprint(load_config(path)) == config_fingerprint(cfg)


def test_fingerprint_tracks_training_keys_only(tmp_path):
    path = write(tmp_path, {"c.yaml": TINY})
    base = config_fingerprint(load_config(path))
    assert len(base) == 64 and base == config_fingerprint(load_config(path))
    assert config_fingerprint(load_config(path, ["optimizer.lr=2e-6"])) != base
    assert config_fingerprint(load_config(path, ["run.seed=7"])) != base
    for harmless in ("logging.tensorboard=false", "train.save_interval=3", "eval.max_batches=2",
                     "description=x", "run.out_dir=elsewhere"):
        assert config_fingerprint(load_config(path, [harmless])) == base, harmless


def test_check_resume_refuses_a_changed_config_and_lists_keys(tmp_path):
    path = write(tmp_path, {"c.yaml": TINY})
    run_dir = tmp_path / "run"
    check_resume(load_config(path), run_dir)             # fresh run dir: nothing to compare
    save_resolved(load_config(path), run_dir)
    check_resume(load_config(path, ["train.log_interval=5"]), run_dir)
    with pytest.raises(ConfigError) as err:
        check_resume(load_config(path, ["optimizer.lr=2e-6", "optimizer.max_angle=30"]), run_dir)
    assert err.value.problems == ["optimizer.lr: 1.25e-06 in the run dir, 2e-06 now",
                                  "optimizer.max_angle: 45.0 in the run dir, 30.0 now"]


def test_plan_config_package_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import replay_megatron.config, replay_megatron.config.plan, "
            "replay_megatron.config.reference; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'torch_npu', "
            "'transformers')]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
