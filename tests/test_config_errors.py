"""Malformed configs, one per row, each giving its own specific error (file, dotted key, value, allowed values).

Every row writes `run.yaml` extending a valid `base.yaml` (plus any extra files), loads it with the row's
overrides and world size, and checks the ConfigError text contains every expected fragment.
"""
from __future__ import annotations


import pytest

from replay_megatron.config import ConfigError, load_config

BASE = ("model: {preset: qwen3-tiny, params_dtype: fp32}\ndata: {seq_length: 64}\n"
        "train: {loss: full, global_batch_size: 4}\n")

CASES = {
    "unknown key, with suggestion": (
        "optimizer: {max_angel: 30}", (), None,
        ["optimizer.max_angel (set in run.yaml): unknown key (did you mean 'max_angle'?)", "valid keys: name, lr"]),
    "unknown section": (
        "optimiser: {lr: 1.0e-6}", (), None, ["optimiser (set in run.yaml): unknown key (did you mean 'optimizer'?)"]),
    "unknown key in an override": (
        "", ("train.micro_batch=2",), None,
        ["override 'train.micro_batch=2': unknown key 'micro_batch' in train (did you mean 'micro_batch_size'?)",
         "valid keys: loss, kl_weight"]),
    "override below a value": (
        "", ("optimizer.lr.x=1",), None, ["optimizer.lr is a value, not a section"]),
    "override without =": ("", ("optimizer.lr",), None, ["expected key=value"]),
    "wrong type": (
        "train: {global_batch_size: sixteen}", (), None,
        ["train.global_batch_size = 'sixteen' (set in run.yaml): Input should be a valid integer"]),
    "wrong type for a bool": (
        "parallel: {distributed_optimizer: 1}", (), None,
        ["parallel.distributed_optimizer = 1 (set in run.yaml): Input should be a valid boolean"]),
    "bad literal lists the allowed values": (
        "optimizer: {clip_mode: rotat}", (), None,
        ["optimizer.clip_mode = 'rotat' (set in run.yaml): Input should be 'paper' or 'rotate'"]),
    "bad optimizer name from the command line": (
        "", ("optimizer.name=lion",), None,
        ["optimizer.name = 'lion' (set on the command line): Input should be 'moclip', 'adamw', 'adam_atan2'"]),
    "bad preset with suggestion": (
        "model: {preset: qwen3-4B}", (), None,
        ["model.preset = 'qwen3-4B' (set in run.yaml): unknown preset (did you mean 'qwen3-4b'", "'qwen3-tiny'"]),
    "out of range": (
        "optimizer: {max_angle: 200}", (), None,
        ["optimizer.max_angle = 200 (set in run.yaml): Input should be less than or equal to 180"]),
    "tuple element": (
        "optimizer: {betas: [0.9, 1.5]}", (), None, ["optimizer.betas = [0.9, 1.5]", "each beta must be in [0, 1)"]),
    "position amount": (
        "collect: {positions: {amount: 1.5}}", (), None,
        ["collect.positions.amount = 1.5 (set in run.yaml): a fraction (float) must be in (0, 1]"]),
    "TP does not divide heads": (
        "parallel: {tensor_model_parallel_size: 3}", (), None,
        ["parallel.tensor_model_parallel_size = 3 (set in run.yaml): TP must divide the model's "
         "num_attention_heads = 4, num_key_value_heads (query groups) = 2", "valid TP: [1, 2]"]),
    "TP does not divide KV heads": (
        "parallel: {tensor_model_parallel_size: 4}", (), None,
        ["TP must divide the model's num_key_value_heads (query groups) = 2; valid TP: [1, 2]"]),
    "PP does not divide layers": (
        "parallel: {pipeline_model_parallel_size: 3}", (), None,
        ["parallel.pipeline_model_parallel_size = 3 (set in run.yaml): PP must divide the model's "
         "num_hidden_layers = 4; valid PP: [1, 2, 4]"]),
    "global batch not divisible by micro x DP": (
        "train: {global_batch_size: 6}", (), 4,
        ["train.global_batch_size = 6 (set in run.yaml): must be divisible by train.micro_batch_size x DP = "
         "1 x 4 = 4 (world 4 = TP 1 x PP 1 x DP 4)"]),
    "global batch inherited from the base": (
        "", ("train.micro_batch_size=3",), None,
        ["train.global_batch_size = 4 (set in base.yaml): must be divisible by train.micro_batch_size x DP = 3"]),
    "world size not divisible by TP x PP": (
        "parallel: {pipeline_model_parallel_size: 2}", (), 3,
        ["parallel (set in run.yaml): world size 3 is not divisible by TP x PP = 1 x 2 = 2"]),
    "sequence parallel without TP": (
        "parallel: {sequence_parallel: true}", (), None,
        ["parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1"]),
    "both preset and hf_path": (
        "model: {hf_path: hf/x}", (), None,
        ["model (set in base.yaml; set in run.yaml): set exactly one of model.preset or model.hf_path (got both)"]),
    "neither preset nor hf_path": (
        "", ("model.preset=null",), None, ["set exactly one of model.preset or model.hf_path (got neither)"]),
    "missing HF config.json names the path": (
        "model: {preset: null, hf_path: no/such/ckpt}", (), None,
        ["model.hf_path = 'no/such/ckpt' (set in run.yaml): no HF config at no/such/ckpt/config.json"]),
    "unknown model override key": (
        "model: {overrides: {num_layers: 2}}", (), None,
        ["model.overrides.num_layers = 2 (set in run.yaml): not a key of preset 'qwen3-tiny' "
         "(did you mean 'num_hidden_layers'"]),
    "sequence longer than the model's positions": (
        "data: {seq_length: 1024}", (), None,
        ["data.seq_length = 1024 (set in run.yaml): exceeds the model's max_position_embeddings = 512"]),
    "replay loss without a store": (
        "train: {loss: replay}", (), None,
        ["train.replay_store = None (default): train.loss=replay needs a replay store"]),
    "KL term without stored logits": (
        "train: {loss: replay, kl_weight: 0.5}\ncollect: {store_dir: s}", (), None,
        ["train.kl_weight = 0.5 (set in run.yaml): the KL term needs teacher logits"]),
    "KL term with the full loss": (
        "train: {kl_weight: 0.5}", (), None, ["train.kl_weight > 0 needs train.loss=replay"]),
    "both train_iters and epochs": (
        "train: {train_iters: 10, epochs: 1}", (), None, ["set exactly one of train.train_iters or train.epochs"]),
    "adam_atan2 with a clipping angle": (
        "optimizer: {name: adam_atan2, max_angle: 45}", (), None,
        ["optimizer.name=adam_atan2 is MoClip without clipping: optimizer.max_angle must be 180"]),
    "optimizer field the optimizer does not read": (
        "optimizer: {name: adamw, max_angle: 30}", (), None,
        ["optimizer.max_angle = 30.0 (set in run.yaml): optimizer 'adamw' does not read it (it reads betas, "
         "clip_grad, eps, lr"]),
    "Muon under the distributed optimizer": (
        "optimizer: {name: muonclip}\nparallel: {distributed_optimizer: true}", (), None,
        ["parallel.distributed_optimizer = True (set in run.yaml): optimizer 'muonclip' runs on megatron-core's "
         "Muon, which does not support the distributed optimizer"]),
    "Muon in fp16": (
        "optimizer: {name: adamuon}\nmodel: {params_dtype: fp16}", (), None,
        ["model.params_dtype = 'fp16' (set in run.yaml): optimizer 'adamuon' runs on megatron-core's Muon, "
         "which does not support fp16"]),
    "invalid YAML": ("optimizer: {lr: [1", (), None, ["run.yaml: not valid YAML"]),
    "duplicate key": ("optimizer: {lr: 1.0e-6}\noptimizer: {name: adamw}", (), None,
                      ["run.yaml: not valid YAML", "duplicate key 'optimizer'"]),
    "top level not a mapping": ("- a\n- b", (), None, ["run.yaml: the top level must be a mapping of sections"]),
    "missing extends file": (
        "extends: [base.yaml, nope.yaml]", (), None, ["run.yaml: extends 'nope.yaml': no such file", "nope.yaml"]),
    "extends cycle": (
        "extends: [base.yaml, loop.yaml]", (), None, ["extends cycle: run.yaml -> loop.yaml -> run.yaml"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_config_gives_its_specific_error(case, tmp_path, monkeypatch):
    body, overrides, world_size, expected = CASES[case]
    monkeypatch.chdir(tmp_path)  # error messages show paths relative to the working directory
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "loop.yaml").write_text("extends: run.yaml\n")
    text = body if body.startswith(("extends", "- ")) else f"extends: base.yaml\n{body}\n"
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config("run.yaml", overrides, world_size=world_size)
    message = str(err.value)
    assert message.startswith("invalid config run.yaml"), message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert len(err.value.problems) == 1, message  # one mistake, one line


def test_error_header_names_the_extends_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(BASE + "optimizer: {clip_mode: bad}\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\n")
    (tmp_path / "run.yaml").write_text("extends: mid.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config("run.yaml")
    assert str(err.value).splitlines() == [
        "invalid config run.yaml (run.yaml extends mid.yaml; mid.yaml extends base.yaml):",
        "  optimizer.clip_mode = 'bad' (set in base.yaml): Input should be 'paper' or 'rotate'"]


def test_every_problem_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(BASE + "optimizer: {clip_mode: bad, lr: -1}\nrun: {seeed: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config("run.yaml")
    keys = sorted(p.split(" ")[0] for p in err.value.problems)
    assert keys == ["optimizer.clip_mode", "optimizer.lr", "run.seeed"]
