"""`replay-megatron eval` on a hand-made run dir (final weights at iter_0000002, a preset's starting weights at
iter_0000000, an HF export): eval.json's perplexities and relative L2 equal the transformers / float64
references of the same weights at TP1 and TP2, the domain metric runs, and missing inputs are named."""
import json
import math

import pytest

from qwen3_fixtures import hf_state_dict
from replay_megatron.platform.spawn import run_local
from evaluation_fixtures import LOSS_TOL, SEQ, hf_pair, hf_reference_loss, reference_distance, write_eval_store



def save_weights(hf, state_dicts, directories):
    """On one rank: each HF state dict saved with save_megatron into its directory."""
    from replay_megatron.models.checkpoint import save_megatron
    from replay_megatron.models.conversion import load_hf_into_model
    from replay_megatron.models.qwen3 import build_model, transformer_config
    from replay_megatron.platform.distributed import initialize, shutdown

    initialize(device="cpu")
    for sd, directory in zip(state_dicts, directories):
        model = build_model(hf, transformer_config(hf), pre_process=True, post_process=True)
        load_hf_into_model(model, sd, hf, tp=1, tp_rank=0)
        save_megatron(model, directory, hf)
    shutdown()


def cli_eval(argv):
    from replay_megatron.cli.main import main

    return main(["eval", *argv])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from replay_megatron.demo.generate import DemoDataConfig, generate_demo_data, train_demo_tokenizer
    from replay_megatron.models.checkpoint import write_hf_dir

    root = tmp_path_factory.mktemp("evalcli")
    hf, base, ft = hf_pair(vocab_size=512)  # the demo tokenizer's vocabulary
    samples = write_eval_store(root / "heldout", hf)
    run_dir = root / "runs" / "r"
    checkpoints = run_dir / "checkpoints"
    run_local(save_weights, 1, hf, [hf_state_dict(base), hf_state_dict(ft)],
              [str(checkpoints / "iter_0000000" / "model"), str(checkpoints / "iter_0000002" / "model")])
    (checkpoints / "iter_0000002" / "train_state.json").write_text("{}")
    (checkpoints / "latest").write_text("iter_0000002")
    write_hf_dir(run_dir / "hf", hf_state_dict(ft), hf)
    write_hf_dir(root / "hf_base", hf_state_dict(base), hf)
    generate_demo_data(root / "demo", DemoDataConfig.quick(seed=2))
    train_demo_tokenizer(root / "demo", vocab_size=512)
    config = root / "eval.yaml"
    config.write_text(
        f"platform: {{device: cpu}}\n"
        f"run: {{name: r, out_dir: {root / 'runs'}, data_root: {root}}}\n"
        f"model: {{preset: qwen3-tiny, params_dtype: fp32}}\n"
        f"train: {{loss: full}}\n"
        f"data: {{eval: heldout, seq_length: {SEQ}, tokenizer: demo/tokenizer.model}}\n"
        f"eval: {{micro_batch_size: 2, domain: {{data: demo/domain_heldout.jsonl, max_new_tokens: 4, limit: 3}}}}\n")
    expected = {"base": hf_reference_loss(base, samples), "finetuned": hf_reference_loss(ft, samples),
                "relative_l2": reference_distance(ft, base)}
    return {"root": root, "run_dir": run_dir, "config": str(config), "expected": expected}


def _check(result, expected):
    for key in ("base", "finetuned"):
        loss, tokens = expected[key]
        assert result[key]["tokens"] == tokens and abs(result[key]["eval_loss"] - loss) < LOSS_TOL
    change = result["finetuned"]["perplexity"] - result["base"]["perplexity"]
    assert result["perplexity_change"] == pytest.approx(change, rel=1e-12)
    assert result["perplexity_change_rel"] == pytest.approx(change / result["base"]["perplexity"], rel=1e-12)
    assert result["relative_l2"] == pytest.approx(expected["relative_l2"], rel=1e-10)
    assert math.isclose(math.exp(expected["finetuned"][0]) - math.exp(expected["base"][0]),
                        result["perplexity_change"], rel_tol=1e-4)


def test_eval_tp1_with_domain(run):
    assert run_local(cli_eval, 1, ["--config", run["config"]]) == [0]
    result = json.loads((run["run_dir"] / "eval.json").read_text())
    _check(result, run["expected"])
    assert result["base_weights"].endswith("iter_0000000/model") and result["checkpoint"].endswith("iter_0000002")
    domain = result["domain"]
    assert domain["examples"] == 3 and 0.0 <= domain["accuracy"] <= 1.0 and len(domain["first_predictions"]) == 3


@pytest.mark.multiproc
def test_eval_tp2_with_an_hf_base_equals_references(run):
    """TP2, the base given as an HF directory (eval.base_checkpoint): the same numbers."""
    argv = ["--config", run["config"], "parallel.tensor_model_parallel_size=2", "eval.domain=null",
            "eval.base_checkpoint=hf_base"]
    assert run_local(cli_eval, 2, argv) == [0, 0]
    result = json.loads((run["run_dir"] / "eval.json").read_text())
    _check(result, run["expected"])
    assert result["parallel"] == {"tp": 2, "pp": 1, "dp": 1} and result["domain"] is None
    assert result["base_weights"] == str(run["root"] / "hf_base")


def test_base_weights_choice(run, tmp_path):
    """eval.base_checkpoint first, then model.mcore_checkpoint / model.hf_path, then the run's iter_0000000."""
    from replay_megatron.config import load_config
    from replay_megatron.runs.evaluate import base_weights

    root, run_dir = run["root"], run["run_dir"]
    mcore = run_dir / "checkpoints" / "iter_0000002" / "model"
    cases = [([], run_dir / "checkpoints" / "iter_0000000" / "model"),
             (["eval.base_checkpoint=hf_base"], root / "hf_base"),
             ([f"model.mcore_checkpoint={mcore}"], mcore),
             (["model.preset=null", "model.hf_path=hf_base"], root / "hf_base"),
             (["eval.base_checkpoint=hf_base", f"model.mcore_checkpoint={mcore}"], root / "hf_base")]
    for overrides, expected in cases:
        assert base_weights(load_config(run["config"], overrides), run_dir) == expected, overrides
    with pytest.raises(FileNotFoundError, match="iter_0000000/model"):
        base_weights(load_config(run["config"]), tmp_path)


def test_missing_inputs_are_named(run, tmp_path, capsys, monkeypatch):
    from replay_megatron.cli.main import main

    assert main(["eval", "--config", run["config"], "--run-dir", str(tmp_path / "nothing")]) == 2
    assert str(tmp_path / "nothing" / "checkpoints" / "latest") in capsys.readouterr().err
    assert main(["eval", "--config", run["config"], "eval.base_checkpoint=missing_base"]) == 2
    err = capsys.readouterr().err
    assert str(run["root"] / "missing_base") in err and "eval.base_checkpoint" in err
    # the domain data's databases are checked before any model is built, not after the perplexities
    lonely = tmp_path / "domain.jsonl"
    lonely.write_text(json.dumps({"prompt": "q", "response": "SELECT 1", "db_id": "d"}) + "\n")
    with monkeypatch.context() as patch:
        patch.setattr("replay_megatron.platform.distributed.initialize",
                      lambda **_: pytest.fail("eval started work before refusing its domain data"))
        assert main(["eval", "--config", run["config"], f"eval.domain.data={lonely}"]) == 2
    assert str(tmp_path / "databases") in capsys.readouterr().err
