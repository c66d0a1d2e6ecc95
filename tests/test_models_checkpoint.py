"""HF <-> megatron-core dist checkpoints: bitwise round trip at TP2/PP2, TP2/PP1 -> TP1/PP2 resharding
with equal logits (1e-5), and clear refusals (not Qwen3, TP not dividing heads, mismatched checkpoint)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qwen3_fixtures import random_tokens, tiny_hf_config, tiny_hf_model
from replay_megatron.cli.verify_conversion import megatron_logits
from replay_megatron.models.checkpoint import (META_FILE, CheckpointMismatch, convert_hf_to_megatron,
                                               convert_megatron_to_hf, load_megatron)
from replay_megatron.models.qwen3 import NotQwen3Error
from replay_megatron.platform.spawn import run_local

pytestmark = pytest.mark.mcore_compat  # CI also runs these on megatron-core 0.12.1 (README)


def save_hf(tmp_path, name, seed=0):
    hf_dir = tmp_path / f"hf-{name}"
    tiny_hf_model(tiny_hf_config(name), seed=seed).save_pretrained(hf_dir, safe_serialization=True)
    return hf_dir


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3-tiny-untied"])
def test_hf_megatron_tp2_pp2_hf_round_trip_is_bitwise(tmp_path, name):
    from transformers import AutoModelForCausalLM

    hf_dir = save_hf(tmp_path, name)
    convert_hf_to_megatron(str(hf_dir), str(tmp_path / "mcore"), tp=2, pp=2)
    meta = json.loads((tmp_path / "mcore" / META_FILE).read_text())
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]) == (2, 2)
    convert_megatron_to_hf(str(tmp_path / "mcore"), str(tmp_path / "back"))
    before, after = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert ("lm_head.weight" in after) == (name == "qwen3-tiny-untied")  # tied embeddings omitted, as HF does
    for key in before:
        assert torch.equal(before[key], after[key]), key
    AutoModelForCausalLM.from_pretrained(tmp_path / "back")  # transformers loads the exported dir


@pytest.mark.multiproc
def test_checkpoint_written_at_tp2_pp1_loads_at_tp1_pp2_with_same_logits(tmp_path):
    hf_dir = save_hf(tmp_path, "qwen3-tiny-untied")
    mcore = tmp_path / "mcore"
    convert_hf_to_megatron(str(hf_dir), str(mcore), tp=2, pp=1)
    tokens = random_tokens(tiny_hf_config("qwen3-tiny-untied"), batch=2, seq=16)
    written = next(r for r in run_local(megatron_logits, 2, str(hf_dir), None, tokens, 2, 1, "cpu") if r)
    loaded = next(r for r in run_local(megatron_logits, 2, str(hf_dir), str(mcore), tokens, 1, 2, "cpu") if r)
    assert written[0].abs().max() > 1.0
    assert (written[0] - loaded[0]).abs().max().item() < 1e-5


def test_refuses_config_that_is_not_qwen3(tmp_path):
    hf_dir = save_hf(tmp_path, "qwen3-tiny")
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(NotQwen3Error, match="model_type='llama'"):
        convert_hf_to_megatron(str(hf_dir), str(tmp_path / "mcore"), tp=1, pp=1)


def test_refuses_tp_not_dividing_heads(tmp_path):
    hf_dir = save_hf(tmp_path, "qwen3-tiny")
    with pytest.raises(ValueError, match="TP=3 must divide num_attention_heads=4"):
        convert_hf_to_megatron(str(hf_dir), str(tmp_path / "mcore"), tp=3, pp=1)


def load_errors(mcore_dir, configs):
    """On one rank: the error message of loading `mcore_dir` into a model built from each HF config."""
    from replay_megatron.models.qwen3 import build_model, transformer_config
    from replay_megatron.platform.distributed import initialize, shutdown

    initialize(device="cpu", tp=1, pp=1)
    messages = []
    for hf in configs:
        model = build_model(hf, transformer_config(hf), pre_process=True, post_process=True)
        try:
            load_megatron(model, mcore_dir, hf)
            messages.append(None)
        except CheckpointMismatch as exc:
            messages.append(str(exc))
    shutdown()
    return messages


@pytest.mark.multiproc
def test_refuses_checkpoint_with_mismatched_config_or_shapes(tmp_path):
    hf_dir = save_hf(tmp_path, "qwen3-tiny")
    mcore = tmp_path / "mcore"
    convert_hf_to_megatron(str(hf_dir), str(mcore), tp=1, pp=1)
    saved = json.loads((mcore / META_FILE).read_text())
    hf = saved["hf_config"]
    # A checkpoint whose recorded config was edited to match a wider MLP: the tensors themselves disagree.
    lying = tmp_path / "lying"
    shutil.copytree(mcore, lying)
    (lying / META_FILE).write_text(json.dumps({**saved, "hf_config": {**hf, "intermediate_size": 256}}))
    (same, other_config), (shapes,) = (run_local(load_errors, 1, str(mcore), [hf, {**hf, "hidden_size": 128}])[0],
                                       run_local(load_errors, 1, str(lying), [{**hf, "intermediate_size": 256}])[0])
    assert same is None
    assert "hidden_size=64" in other_config and "hidden_size=128" in other_config
    # Layers are stacked in the dist checkpoint: [layers, ...]; fc2 is [hidden, ffn].
    assert "'decoder.layers.mlp.linear_fc" in shapes and "has global shape" in shapes, shapes
    assert ("(4, 256, 64)" in shapes and "(4, 512, 64)" in shapes) or ("(4, 64, 128)" in shapes and "(4, 64, 256)" in shapes)
