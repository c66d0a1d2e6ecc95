"""Every config in configs/ loads, validates and plans; the paper's runs say what SPEC.md section 6 says."""
from __future__ import annotations

from pathlib import Path

import pytest

from replay_megatron.config import load_config
from replay_megatron.config.loader import config_files
from replay_megatron.config.plan import format_plan, make_plan
from replay_megatron.config.reference import schema_reference

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUNS = sorted(p for p in CONFIGS.rglob("*.yaml") if "base" not in p.relative_to(CONFIGS).parts)
BASES = sorted((CONFIGS / "base").rglob("*.yaml"))


def _id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


@pytest.mark.parametrize("path", RUNS, ids=_id)
def test_config_loads_and_plans_within_device_memory(path):
    cfg = load_config(path)
    plan = make_plan(cfg)
    text = format_plan(plan)
    assert text.splitlines()[-1].startswith("verdict: OK"), text
    assert cfg.description, "every run says what it reproduces"


def test_run_names_are_unique():
    names = {}
    for path in RUNS:
        name = load_config(path).run.name
        assert name not in names, f"{_id(path)} and {names[name]} write the same run dir {name}"
        names[name] = _id(path)


def test_every_base_fragment_is_used():
    used = {f for path in RUNS for f in config_files(path)}
    assert [_id(b) for b in BASES if b not in used] == [], "base fragments extended by no run config"


def _load(rel: str):
    return load_config(CONFIGS / rel)


@pytest.mark.parametrize("model, tp, pp, preset", [("qwen3_4b", 4, 1, "qwen3-4b"), ("qwen3_8b", 4, 2, "qwen3-8b")])
def test_paper_runs_follow_spec_section_6(model, tp, pp, preset):
    methods = {"sft_adamw": ("full", "adamw"), "sft_moclip": ("full", "moclip"),
               "topk_adamw": ("replay", "adamw"), "topk_moclip": ("replay", "moclip"),
               "mofo": ("full", "mofo"), "tam": ("full", "tam"), "adamuon": ("full", "adamuon"),
               "muonclip": ("full", "muonclip")}
    for name, (loss, optimizer) in methods.items():
        cfg = _load(f"paper/{model}/{name}.yaml")
        assert (cfg.model.preset, cfg.parallel.tensor_model_parallel_size,
                cfg.parallel.pipeline_model_parallel_size) == (preset, tp, pp)
        assert (cfg.train.loss, cfg.optimizer.name) == (loss, optimizer), name
        assert (cfg.train.global_batch_size, cfg.data.seq_length, cfg.optimizer.lr, cfg.train.epochs) \
            == (16, 4096, 1.25e-6, 1)
        assert (cfg.collect.k_max, cfg.collect.tau, cfg.collect.positions.strategy,
                cfg.collect.positions.buckets) == (200, 0.95, "bucket", 5)
        assert cfg.optimizer.max_angle == 45 and cfg.model.params_dtype == "bf16"
    assert _load(f"paper/{model}/mofo.yaml").optimizer.mofo_fraction == 0.2


def test_ablations_vary_one_thing():
    ref = _load("paper/qwen3_4b/topk_moclip.yaml")
    for angle in (30, 45, 60, 90):
        cfg = _load(f"ablations/qwen3_4b/max_angle_{angle}.yaml")
        assert cfg.optimizer.max_angle == angle
        assert cfg.model_copy(update={"run": ref.run, "description": ref.description,
                                      "optimizer": ref.optimizer}) == ref
    stores = set()
    for strategy in ("random", "last", "bucket"):
        cfg = _load(f"ablations/qwen3_4b/positions_{strategy}.yaml")
        assert cfg.collect.positions.strategy == strategy and cfg.train.replay_store == cfg.collect.store_dir
        stores.add(cfg.collect.store_dir)
    assert len(stores) == 3, "each strategy collects into its own store"
    assert _load("ablations/qwen3_4b/adam_atan2.yaml").optimizer.max_angle == 180
    assert {_load(f"ablations/qwen3_4b/moclip_adam_eps_{e}.yaml").optimizer.eps for e in ("1e-8", "1e-6")} \
        == {1e-8, 1e-6}
    assert _load("ablations/qwen3_4b/tam_cosine.yaml").optimizer.tam_variant == "cosine"


def test_cpu_configs_are_tiny_fp32_cpu():
    for path in sorted((CONFIGS / "cpu").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.preset.startswith("qwen3-tiny") and cfg.model.params_dtype == "fp32"
        assert cfg.platform.device == "cpu" and cfg.train.train_iters is not None
        assert cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size <= 4


def test_readme_field_reference_is_current():
    readme = (CONFIGS / "README.md").read_text()
    assert schema_reference() in readme, "regenerate with: python -m replay_megatron.config.reference"
