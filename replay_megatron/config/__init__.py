"""Typed run configs: YAML with `extends:`, `key=value` overrides, validation with errors that name the file.

Public API (see schema.py for every section and field):
    load_config(path, overrides=(), *, world_size=None) -> ReplayConfig
    validate_config(cfg, world_size=None)        re-check once the real world size is known
    model_hf_config(cfg) -> dict                 HF config.json dict of the model section
    save_resolved(cfg, run_dir) -> Path          <run_dir>/resolved.yaml, written atomically
    config_fingerprint(cfg) -> str               sha256 of the canonical resolved config
    check_resume(cfg, run_dir)                   refuse a run dir started with another config
"""
from replay_megatron.config.errors import ConfigError
from replay_megatron.config.loader import load_config, validate_config
from replay_megatron.config.model_shape import ModelShape, model_hf_config, model_shape
from replay_megatron.config.resolved import check_resume, config_fingerprint, load_resolved, save_resolved
from replay_megatron.config.schema import ReplayConfig

__all__ = ["ConfigError", "ModelShape", "ReplayConfig", "check_resume",
           "config_fingerprint", "load_config", "load_resolved", "model_hf_config", "model_shape",
           "save_resolved", "validate_config"]
