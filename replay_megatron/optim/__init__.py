"""Optimizers: MoClip (SPEC.md section 3), the plain-optimizer baselines of SPEC.md section 4 (TAM,
MoFO; Adam-atan2 and "MoClip without atan2" are MoClip settings), their distributed statistics
(`stats`, `tensor_layout`, `top_k`), the builder of megatron-core's optimizer wrappers around them
(`build_optimizer`), AdaMuon and MuonClip on megatron-core's Muon (`muon`, `attention_clip`; imported
only where used: they need the emerging-optimizers package) and the registry of config names
(`optim.registry`).

Names are imported on first use, so that the config layer can read `optim.registry` without torch.
"""
from importlib import import_module
from typing import Any

_EXPORTS = {"MoClip": "moclip", "MoClipStats": "moclip", "MoFO": "mofo", "TAM": "tam",
            "GlobalSumsReducer": "stats", "TensorLayout": "tensor_layout",
            "counts_toward_global_stats": "stats", "build_optimizer": "megatron",
            "load_optimizer_state": "megatron", "moclip_optimizers": "megatron"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"replay_megatron.optim.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
