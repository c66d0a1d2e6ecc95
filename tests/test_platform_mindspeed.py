"""platform.mindspeed_adaptor is wired: typed in the config, and on CPU (no MindSpeed installed) `on`
refuses clearly at initialisation while `off` and `auto` import nothing."""
import importlib.util
import sys

import pytest

from replay_megatron.config import ConfigError, load_config
from replay_megatron.platform.mindspeed import MindSpeedUnavailable, apply_mindspeed_adaptor
from replay_megatron.platform.spawn import RankFailed, run_local

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mindspeed") is not None,
                                reason="MindSpeed is installed: these check the machine without it")


def test_config_switch_defaults_to_auto_and_refuses_other_values(tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text("model: {preset: qwen3-tiny}\ndata: {seq_length: 64}\ntrain: {loss: full}\n")
    assert load_config(cfg_path).platform.mindspeed_adaptor == "auto"
    assert load_config(cfg_path, ["platform.mindspeed_adaptor=on"]).platform.mindspeed_adaptor == "on"
    cfg_path.write_text(cfg_path.read_text() + "platform: {mindspeed_adaptor: off}\n")  # YAML: a boolean
    assert load_config(cfg_path).platform.mindspeed_adaptor == "off"
    with pytest.raises(ConfigError, match="platform.mindspeed_adaptor = 'always'.*'auto', 'on' or 'off'"):
        load_config(cfg_path, ["platform.mindspeed_adaptor=always"])


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "npu"])
def test_off_and_auto_import_nothing_without_mindspeed(device_type):
    assert not apply_mindspeed_adaptor("off", device_type)
    assert not apply_mindspeed_adaptor("auto", device_type)
    assert not any(name == "mindspeed" or name.startswith("mindspeed.") for name in sys.modules)


def test_on_refuses_naming_the_switch():
    with pytest.raises(MindSpeedUnavailable, match="platform.mindspeed_adaptor=on: mindspeed.megatron_adaptor "
                                                   "does not import .*ModuleNotFoundError"):
        apply_mindspeed_adaptor("on", "cpu")
    with pytest.raises(ValueError, match="allowed: auto, on, off"):
        apply_mindspeed_adaptor("yes", "cpu")


def initialize_with(mode):
    from replay_megatron.platform.distributed import initialize

    initialize(device="cpu", mindspeed_adaptor=mode)


@pytest.mark.multiproc
def test_initialize_applies_the_switch():
    """(Every other test that initialises, on CPU with the default `auto`, shows that `auto` lets it run.)"""
    with pytest.raises(RankFailed, match="MindSpeedUnavailable: platform.mindspeed_adaptor=on"):
        run_local(initialize_with, 1, "on", timeout=120)
