"""`replay-megatron verify-conversion`: passes for a correct conversion (on the fly at TP2), fails (exit 1)
for a checkpoint converted from other weights, and prints the three figures."""
import re

import pytest

from qwen3_fixtures import tiny_hf_config, tiny_hf_model
from replay_megatron.cli.main import main
from replay_megatron.models.checkpoint import convert_hf_to_megatron


def figures(text):
    return [float(x) for x in re.findall(r"= ([0-9.e+-]+)", text)]


@pytest.mark.multiproc
def test_verify_conversion_passes_on_the_fly_and_fails_for_wrong_checkpoint(tmp_path, capsys):
    hf = tiny_hf_config("qwen3-tiny")
    good, other = tmp_path / "hf", tmp_path / "hf-other"
    tiny_hf_model(hf, seed=0).save_pretrained(good, safe_serialization=True)
    tiny_hf_model(hf, seed=1).save_pretrained(other, safe_serialization=True)

    assert main(["verify-conversion", "--hf", str(good), "--tp", "2", "--pp", "1", "--seq-length", "16"]) == 0
    out = capsys.readouterr().out
    max_abs, _, max_loss = figures(out[out.index("max |delta logit|"):])[:3]
    assert "PASS" in out and max_abs < 1e-4 and max_loss < 1e-4

    convert_hf_to_megatron(str(other), str(tmp_path / "mcore-other"), tp=1, pp=1)
    assert main(["verify-conversion", "--hf", str(good), "--mcore", str(tmp_path / "mcore-other"),
                 "--tp", "1", "--pp", "1", "--seq-length", "16"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and figures(out[out.index("max |delta logit|"):])[0] > 1e-2
