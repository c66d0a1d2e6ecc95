"""A replay store is bound to the run that trains on it: the collect settings it was made with are the run's.

`train` reads `collect.k_max` for its K statistics and `resolved.yaml` records the `collect` section as the
run's, so a store collected with other settings would make both describe another run; it is refused
before any work, naming each differing key (the fingerprints are checked by `ReplayStore.open`).
"""
from __future__ import annotations

from typing import Any, Mapping

from replay_megatron.config.errors import ConfigError, Problem

# dotted keys of both the config and the store manifest's `config` (replay.records.manifest_config)
BOUND_KEYS = ("collect.tau", "collect.k_max", "collect.positions.strategy", "collect.positions.amount",
              "collect.positions.buckets")
_ABSENT = object()


def _manifest_value(recorded: Mapping[str, Any], dotted: str) -> Any:
    node: Any = recorded
    for part in dotted.split("."):
        node = node.get(part, _ABSENT) if isinstance(node, Mapping) else _ABSENT
    return node


def _config_value(cfg, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_store_settings(manifest: Mapping[str, Any], cfg, store_dir: str) -> None:
    """Raise a ConfigError listing each of BOUND_KEYS whose value in `cfg` differs from the store's manifest."""
    problems = []
    for key in BOUND_KEYS:
        stored, wanted = _manifest_value(manifest.get("config", {}), key), _config_value(cfg, key)
        if stored is _ABSENT:
            problems.append(Problem(key, f"the replay store {store_dir} does not record it (a corrupt manifest?)",
                                    wanted))
        elif stored != wanted:
            problems.append(Problem(key, f"the replay store {store_dir} was collected with {stored!r}; set the "
                                    "config to the store's value, or collect a new store", wanted))
    if problems:
        raise ConfigError.of(problems, f"the replay store {store_dir} was collected with other settings than "
                                       "this config")
