"""Preflight checks against files a config points to (run before any device work).

`check_store_matches` refuses a Stage 1 run whose replay store was collected from another model. It compares
`fingerprints.model` of `<store>/manifest.json` with the configured model's fingerprint, which the caller
computes (replay_megatron.replay.fingerprint) and passes in, so this module stays free of model code.
"""
from __future__ import annotations

import json
from typing import Any

from replay_megatron.config.errors import ConfigError, Problem
from replay_megatron.config.schema import ReplayConfig

MANIFEST_NAME = "manifest.json"


def check_store_matches(cfg: ReplayConfig, expected_model_fingerprint: str) -> dict[str, Any]:
    """Raise ConfigError unless `train.replay_store`'s manifest names `expected_model_fingerprint`; returns it."""
    store = cfg.input_path(cfg.train.replay_store)
    if store is None:
        raise ConfigError.of([Problem("train.replay_store", "no replay store configured", None)])
    path = store / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError.of([Problem("train.replay_store", f"no store manifest at {path} (run "
                                                            f"`replay-megatron collect` first)", str(store))]) from None
    except (OSError, ValueError) as e:
        raise ConfigError.of([Problem("train.replay_store", f"unreadable store manifest {path}: {e}",
                                      str(store))]) from None
    found = (manifest.get("fingerprints") or {}).get("model") if isinstance(manifest, dict) else None
    if found is None:
        raise ConfigError.of([Problem("train.replay_store", f"{path} has no fingerprints.model", str(store))])
    if found != expected_model_fingerprint:
        source = cfg.model.preset if cfg.model.preset is not None else cfg.model.hf_path
        raise ConfigError.of([Problem(
            "train.replay_store",
            f"the store was collected from another model: {path} has model fingerprint {found}, the configured "
            f"model ({source!r}) has {expected_model_fingerprint}; collect a store with this model or point "
            f"train.replay_store at a matching one", str(store))])
    return manifest
