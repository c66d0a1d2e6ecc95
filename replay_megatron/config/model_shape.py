"""The model section resolved to a HF config dict (preset or checkpoint config.json) and the shape numbers in it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from replay_megatron.config.errors import ConfigError, Problem, did_you_mean
from replay_megatron.config.schema import ReplayConfig
from replay_megatron.models.presets import preset


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Qwen3 config that layout, parameter counts and memory depend on."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    tied_embeddings: bool
    max_positions: int

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelShape:
        """Read the shape from a HF `config.json` dict (head_dim defaults to hidden/heads, as in HF)."""
        heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // heads
        return cls(vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
                   num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
                   num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(head_dim),
                   ffn_hidden_size=int(hf["intermediate_size"]),
                   tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   max_positions=int(hf.get("max_position_embeddings", 0)) or 1 << 30)


def model_hf_config(cfg: ReplayConfig) -> dict[str, Any]:
    """The HF config dict of `cfg.model`: the preset, or `<hf_path>/config.json`, with `model.overrides` applied."""
    m = cfg.model
    if m.preset is not None:
        base = preset(m.preset)
        origin = f"preset {m.preset!r}"
    else:
        path = cfg.input_path(m.hf_path) / "config.json"
        try:
            base = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError.of([Problem("model.hf_path", f"no HF config at {path}", m.hf_path)]) from None
        except (OSError, ValueError) as e:
            raise ConfigError.of([Problem("model.hf_path", f"cannot read {path}: {e}", m.hf_path)]) from None
        origin = str(path)
    unknown = [k for k in m.overrides if k not in base]
    if unknown:
        raise ConfigError.of([Problem(f"model.overrides.{k}", f"not a key of {origin}{did_you_mean(k, base)}",
                                      m.overrides[k]) for k in unknown])
    return {**base, **m.overrides}


def model_shape(cfg: ReplayConfig) -> ModelShape:
    """The shape of the configured model."""
    return ModelShape.from_hf(model_hf_config(cfg))

