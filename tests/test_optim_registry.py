"""optim.registry is the one table of optimizer names: the schema, plan's memory estimate and train read it."""
import typing

import pytest

from replay_megatron.config.schema import OptimizerName
from replay_megatron.optim import megatron
from replay_megatron.optim.registry import OPTIMIZERS, optimizer_spec, trainable_optimizers


def test_schema_accepts_exactly_the_registry_names():
    assert typing.get_args(OptimizerName) == tuple(OPTIMIZERS)


def test_every_trainable_entry_names_a_megatron_builder():
    assert trainable_optimizers() == ["moclip", "adamw", "adam_atan2", "moclip_adam_eps"]
    for name in trainable_optimizers():
        assert OPTIMIZERS[name].builder in megatron.OPTIMIZERS


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="expected one of moclip, adamw"):
        optimizer_spec("sgd")
