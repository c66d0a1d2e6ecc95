"""The resolved config of a run: saved as `<run_dir>/resolved.yaml`, fingerprinted to refuse mismatched resumes.

The fingerprint is the sha256 of the canonical JSON (sorted keys, no spaces) of the resolved config, minus the
keys in `FINGERPRINT_EXCLUDES`, which change what is logged or evaluated but not the trained numbers, and
the layout and device (`parallel`, `platform`): a run may resume at another TP/PP or on another machine,
the weights reshard and the numbers agree up to floating-point reduction order.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from replay_megatron.atomic_io import atomic_write_text
from replay_megatron.config.errors import ConfigError
from replay_megatron.config.loader import parse_yaml
from replay_megatron.config.schema import ReplayConfig

RESOLVED_NAME = "resolved.yaml"
FINGERPRINT_EXCLUDES = ("description", "run.out_dir", "train.log_interval", "train.save_interval",
                        "train.eval_interval", "train.export_hf", "train.max_consecutive_nonfinite", "eval",
                        "logging", "parallel", "platform")


def config_fingerprint(cfg: ReplayConfig) -> str:
    """sha256 hex digest of the canonical JSON of `cfg` without `FINGERPRINT_EXCLUDES`."""
    canon = json.dumps(_fingerprinted(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def save_resolved(cfg: ReplayConfig, run_dir: str | os.PathLike) -> Path:
    """Write `cfg` as `<run_dir>/resolved.yaml` (atomically), its fingerprint in the header; returns the path."""
    header = (f"# replay-megatron resolved config (every default filled in)\n"
              f"# config fingerprint: {config_fingerprint(cfg)}\n")
    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None)
    return atomic_write_text(Path(run_dir) / RESOLVED_NAME, header + body)


def load_resolved(run_dir: str | os.PathLike) -> ReplayConfig:
    """The config saved in `run_dir` by `save_resolved`; raises ConfigError naming the file."""
    path = Path(run_dir) / RESOLVED_NAME
    try:
        return ReplayConfig.model_validate(parse_yaml(path.read_text()))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no resolved config (not a run directory?)"]) from None
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise ConfigError([f"{path}: unreadable resolved config: {e}".replace("\n", " ")]) from None


def check_resume(cfg: ReplayConfig, run_dir: str | os.PathLike) -> None:
    """Refuse to resume `run_dir` with a config whose fingerprint differs from the saved one (lists the keys).

    A run dir without resolved.yaml is a fresh run and passes.
    """
    if not (Path(run_dir) / RESOLVED_NAME).exists():
        return
    saved = load_resolved(run_dir)
    if config_fingerprint(saved) == config_fingerprint(cfg):
        return
    old, new = _flat(_fingerprinted(saved)), _flat(_fingerprinted(cfg))
    diffs = [f"{k}: {old.get(k)!r} in the run dir, {new.get(k)!r} now" for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k)]
    raise ConfigError(diffs, f"cannot resume {run_dir}: the config differs from the one it was started with "
                             f"(start a new run.name, or restore these keys)")


def _fingerprinted(cfg: ReplayConfig) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    for dotted in FINGERPRINT_EXCLUDES:
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        node.pop(last, None)
    return data


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
