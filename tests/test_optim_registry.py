"""optim.registry is the one table of optimizer names: the schema, plan's memory estimate and train read it."""
import typing

import pytest

from replay_megatron.config.schema import OptimizerName
from replay_megatron.optim import megatron
from replay_megatron.optim.registry import OPTIMIZERS, optimizer_spec


def test_schema_accepts_exactly_the_registry_names():
    assert typing.get_args(OptimizerName) == tuple(OPTIMIZERS)


def test_every_entry_names_a_megatron_builder():
    for spec in OPTIMIZERS.values():
        assert spec.builder in megatron.OPTIMIZERS
        assert spec.muon == (spec.builder in megatron.MUON_OPTIMIZERS)
    assert [name for name, spec in OPTIMIZERS.items() if spec.muon] == ["adamuon", "muonclip"]


def test_muon_unavailable_names_the_missing_package(monkeypatch):
    import sys

    from replay_megatron import mcore_compat

    if mcore_compat.MCORE_VERSION < mcore_compat.MUON_MIN_VERSION:
        assert "has no Muon" in mcore_compat.muon_unavailable_reason()
        return
    monkeypatch.setitem(sys.modules, "emerging_optimizers.orthogonalized_optimizers", None)  # as if not installed
    reason = mcore_compat.muon_unavailable_reason()
    assert "emerging-optimizers" in reason and "--ignore-requires-python" in reason


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="expected one of moclip, adamw"):
        optimizer_spec("sgd")
