"""`plan`: parameter counts against real models, layout, memory formula properties, the CLI's output.

References: Hugging Face's Qwen3ForCausalLM built from the same config (all presets, on the meta device, so
the 8B costs nothing) for the whole-model counts, and megatron-core's GPTModel built at TP1 x PP2 (tied and
untied) and TP2 x PP1 on 2 gloo ranks for the per-rank counts.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from replay_megatron.cli.main import main
from replay_megatron.config import load_config, model_shape
from replay_megatron.config.memory import (DTYPE_BYTES, layer_activation_bytes, store_bytes_per_position,
                                           train_memory)
from replay_megatron.config.model_shape import ModelShape
from replay_megatron.config.params import make_layout, model_params, padded_vocab_size, rank_params
from replay_megatron.models.presets import PRESETS, preset

PAPER_4B = "configs/paper/qwen3_4b/topk_moclip.yaml"
PAPER_8B = "configs/paper/qwen3_8b/topk_moclip.yaml"


def hf_counts(name: str) -> dict[str, int]:
    """Parameter counts of transformers' Qwen3ForCausalLM for preset `name`, by kind."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**preset(name)))
    params = dict(model.named_parameters())  # a tied lm_head is the same Parameter: listed once
    embedding = model.model.embed_tokens.weight.numel()
    output = 0 if model.lm_head.weight is model.model.embed_tokens.weight else model.lm_head.weight.numel()
    norms = sum(p.numel() for p in params.values() if p.dim() == 1)
    return {"total": sum(p.numel() for p in params.values()), "embedding": embedding, "output": output,
            "norms": norms, "matrices": sum(p.numel() for p in params.values()) - embedding - output - norms}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_params_equal_hf_qwen3(name):
    ours = model_params(ModelShape.from_hf(preset(name)))
    assert dataclasses.asdict(ours) | {"total": ours.total} == hf_counts(name)


def test_published_sizes():
    """Qwen3 model cards: 4B = 4.0B total / 3.6B non-embedding, 8B = 8.2B / 6.95B."""
    four, eight = (model_params(ModelShape.from_hf(preset(n))) for n in ("qwen3-4b", "qwen3-8b"))
    assert (round(four.total / 1e9, 1), round(four.transformer / 1e9, 1)) == (4.0, 3.6)
    assert (round(eight.total / 1e9, 1), round(eight.transformer / 1e9, 2)) == (8.2, 6.95)


LAYOUTS = ((1, 2, True), (1, 2, False), (2, 1, True))  # (TP, PP, tied) on 2 ranks


def _megatron_rank_counts(vocab: int) -> list[tuple[str, int]]:
    """On each gloo rank: (layout, parameter count) of megatron's GPTModel for the tiny Qwen3 shapes."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    # megatron moves a tied output copy to CUDA before syncing it; counting parameters needs no device.
    torch.Tensor.cuda = lambda self, *a, **k: self
    dist.init_process_group("gloo")
    shape = ModelShape.from_hf(preset("qwen3-tiny"))
    out = []
    for tp, pp, tied in LAYOUTS:
        ps.initialize_model_parallel(tp, pp)
        cfg = TransformerConfig(
            num_layers=shape.num_layers, hidden_size=shape.hidden_size, num_attention_heads=shape.num_heads,
            num_query_groups=shape.num_kv_heads, kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn_hidden_size,
            gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
            normalization="RMSNorm", qk_layernorm=True, tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp, use_cpu_initialization=True, pipeline_dtype=torch.float32)
        model = GPTModel(cfg, get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
                         vocab_size=padded_vocab_size(vocab, tp, 4), max_sequence_length=64,
                         pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                         share_embeddings_and_output_weights=tied, position_embedding_type="rope")
        stage = ps.get_pipeline_model_parallel_rank()
        out.append((f"tp{tp} pp{pp} tied={tied} stage {stage}", sum(p.numel() for p in model.parameters())))
        ps.destroy_model_parallel()
    return out


@pytest.mark.multiproc
def test_rank_params_equal_megatron_gpt_per_rank():
    from replay_megatron.platform.spawn import run_local

    vocab = 500  # padded to 504 (multiple of 4 x TP2): the padding must show in the per-rank rows
    got = run_local(_megatron_rank_counts, 2, vocab)
    base = {**preset("qwen3-tiny"), "vocab_size": vocab}
    for rank, per_layout in enumerate(got):
        for (label, count), (tp, pp, tied) in zip(per_layout, LAYOUTS):
            shape = ModelShape.from_hf({**base, "tie_word_embeddings": tied})
            layout = make_layout(shape, tp, pp, 2 // (tp * pp), divisible_by=4)
            stage = rank // tp  # megatron's default order: TP fastest, then DP, then PP
            assert label.endswith(f"stage {stage}"), (rank, label)
            assert rank_params(shape, layout, stage).total == count, (rank, label)


def test_layout_stages_and_vocab_padding():
    shape = ModelShape.from_hf(preset("qwen3-8b"))
    lay = make_layout(shape, tp=4, pp=2, dp=3)
    assert lay.stage_layers == (range(0, 18), range(18, 36)) and lay.world == 24
    assert lay.padded_vocab == 151936                       # already a multiple of 4
    assert padded_vocab_size(151936, 4, 128) == 152064       # megatron's default divisor x TP4 = 512
    assert padded_vocab_size(500, 2, 4) == 504 and padded_vocab_size(504, 2, 4) == 504
    with pytest.raises(ValueError, match="PP=5 does not divide num_hidden_layers=36"):
        make_layout(shape, tp=4, pp=5)


def test_rank_params_recompose_the_model():
    """Over all ranks: sharded weights x TP + replicated norms + one tied copy per PP>1 == padded model."""
    for name, tp, pp in (("qwen3-4b", 4, 1), ("qwen3-8b", 4, 2), ("qwen3-4b", 2, 4), ("qwen3-tiny", 2, 2)):
        shape = ModelShape.from_hf(preset(name))
        lay = make_layout(shape, tp, pp)
        ranks = [rank_params(shape, lay, s) for s in range(pp)]
        whole = model_params(shape, vocab=lay.padded_vocab)
        tied_copy = lay.padded_vocab * shape.hidden_size if shape.tied_embeddings and pp > 1 else 0
        assert sum(r.embedding + r.output for r in ranks) * tp == whole.embedding + whole.output + tied_copy
        assert sum(r.matrices for r in ranks) * tp == whole.matrices
        assert sum(r.norms for r in ranks) == whole.norms


def _plan_cfg(path=PAPER_4B, *overrides):
    cfg = load_config(path, overrides)
    return cfg, model_shape(cfg)


def test_weight_grad_and_optimizer_bytes_per_param():
    cfg, shape = _plan_cfg()
    lay = make_layout(shape, 4, 1)
    n = rank_params(shape, lay, 0).total
    mem = train_memory(cfg, shape, lay, 0)
    assert (mem.weights, mem.grads, mem.optimizer) == (2 * n, 4 * n, 12 * n)   # bf16; fp32 grads; m, v, main
    cfg32, _ = _plan_cfg(PAPER_4B, "model.params_dtype=fp32")
    assert train_memory(cfg32, shape, lay, 0).optimizer == 8 * n                # no separate main params
    cfg_do, _ = _plan_cfg(PAPER_4B, "parallel.distributed_optimizer=true")
    assert train_memory(cfg_do, shape, make_layout(shape, 4, 1, dp=2), 0).optimizer == 6 * n  # sharded over DP 2
    p = rank_params(shape, lay, 0)
    tam, _ = _plan_cfg(PAPER_4B, "optimizer.name=tam")
    assert train_memory(tam, shape, lay, 0).optimizer == 8 * n                  # m + main params
    muon, _ = _plan_cfg(PAPER_4B, "optimizer.name=muonclip")
    assert train_memory(muon, shape, lay, 0).optimizer == 4 * p.matrices + 8 * (n - p.matrices) + 4 * n


def test_activation_formula_properties():
    cfg, shape = _plan_cfg()
    one = layer_activation_bytes(cfg, shape, tp=4, micro_batch=1)
    assert layer_activation_bytes(cfg, shape, tp=4, micro_batch=2) == 2 * one
    s, h = cfg.data.seq_length, shape.hidden_size
    sp, _ = _plan_cfg(PAPER_4B, "parallel.sequence_parallel=true")
    # Sequence parallelism splits the 4 H-wide tensors (norm inputs/outputs, residuals) over TP.
    assert one - layer_activation_bytes(sp, shape, tp=4, micro_batch=1) == 4 * s * h * 2 * 3 // 4
    lay = make_layout(shape, 4, 1)
    full, _ = _plan_cfg(PAPER_4B, "train.loss=full")
    extra = train_memory(full, shape, lay, 0).activations - train_memory(cfg, shape, lay, 0).activations
    assert extra == s * (lay.padded_vocab // 4 - (cfg.collect.k_max + 1)) * (2 + 4)  # V/TP vs |S| logits


def test_pipeline_keeps_pp_minus_stage_micro_batches_in_flight():
    cfg, shape = _plan_cfg(PAPER_8B)
    lay = make_layout(shape, 4, 2)
    per_layer = layer_activation_bytes(cfg, shape, 4, 1)
    assert train_memory(cfg, shape, lay, 0).activations == 2 * 18 * per_layer
    one_micro, _ = _plan_cfg(PAPER_8B, "train.global_batch_size=1")
    assert train_memory(one_micro, shape, lay, 0).activations == 18 * per_layer


def test_store_bytes_per_position():
    cfg, _ = _plan_cfg()
    assert store_bytes_per_position(cfg) == 201 * 4 + 12
    fp16, _ = _plan_cfg(PAPER_4B, "collect.store_logits=fp16")
    assert store_bytes_per_position(fp16) == 201 * (4 + 2) + 4 + 12
    assert store_bytes_per_position(fp16, candidates=101) == 101 * 6 + 4 + 12
    assert DTYPE_BYTES["bf16"] == 2


def test_cli_plan_prints_layout_params_and_verdict(capsys):
    assert main(["plan", PAPER_8B]) == 0
    out = capsys.readouterr().out
    for line in ["layout: world 8 = TP 4 x PP 2 x DP 1; sequence parallel off; distributed optimizer off",
                 "  vocab 151936 padded to 151936 (multiple of 4): 37984 rows per TP rank",
                 "  PP stage 0: embedding, layers 0-17 (18)",
                 "  PP stage 1: layers 18-35 (18), final norm, output layer",
                 "parameters: total 8,190,735,360 = embedding 622,329,856 + output 622,329,856 + transformer "
                 "6,946,075,648"]:
        assert line in out.splitlines(), out
    assert out.splitlines()[-1].startswith("verdict: OK (peak ")
    assert main(["plan", "configs/cpu/tiny_tp1pp2.yaml"]) == 0
    out = capsys.readouterr().out
    assert "  PP stage 1: layers 2-3 (2), final norm, output layer (copy of the tied embedding)" in out


def test_cli_plan_world_size_over_and_errors(capsys):
    assert main(["plan", "--world-size", "16", PAPER_8B, "optimizer.lr=2e-6"]) == 0
    out = capsys.readouterr().out
    assert "world 16 = TP 4 x PP 2 x DP 2" in out and "8 micro-batches of 1 x 4096 tokens x DP 2" in out
    assert main(["plan", PAPER_4B, "--device-memory-gb", "8", "--fail-if-over"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("verdict: OVER")
    assert main(["plan", PAPER_4B, "--world-size", "6"]) == 2
    assert "world size 6 is not divisible by TP x PP = 4 x 1 = 4" in capsys.readouterr().err
    assert main(["plan", PAPER_4B, "--stage", "collect", "--train-data", "1000000", "900"]) == 0
    out = capsys.readouterr().out
    assert "Stage 1" not in out and "for 1,000,000 loss-bearing tokens in 900 samples: 500,000 stored positions" \
        in out


def test_cli_plan_sizes_the_store_from_the_token_store(tmp_path, capsys):
    (tmp_path / "tokens" / "sft_train").mkdir(parents=True)
    (tmp_path / "tokens" / "sft_train" / "meta.json").write_text('{"num_loss_tokens": 4000, "num_samples": 10}')
    assert main(["plan", PAPER_4B, f"run.data_root={tmp_path}", "collect.positions.amount=64"]) == 0
    out = capsys.readouterr().out
    assert "for 4,000 loss-bearing tokens in 10 samples: at most 640 stored positions" in out


def test_plan_subcommand_imports_no_megatron():
    code = ("import sys; from replay_megatron.cli.main import main; rc = main(['plan', %r]); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'torch_npu')]; "
            "print(bad); sys.exit(rc or (1 if bad else 0))" % PAPER_8B)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
