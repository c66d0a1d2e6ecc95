"""Megatron Qwen3 == Hugging Face Qwen3ForCausalLM: fp32 logits within 1e-4 for TP in {1,2} x PP in {1,2}."""
import pytest
import torch

from qwen3_fixtures import hf_state_dict, random_tokens, tiny_hf_config, tiny_hf_model
from replay_megatron.platform.spawn import run_local

TOL = 1e-4


def megatron_logits(hf, hf_sd, micro_batches, tp, pp):
    from replay_megatron.models.conversion import load_hf_into_model
    from replay_megatron.models.forward import full_logits
    from replay_megatron.models.qwen3 import build_model, transformer_config
    from replay_megatron.platform.distributed import initialize, shutdown

    layout = initialize(device="cpu", tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    model = build_model(hf, transformer_config(hf, tp=tp, pp=pp),
                        pre_process=layout.is_first_stage, post_process=layout.is_last_stage)
    load_hf_into_model(model, hf_sd, hf, tp=tp, tp_rank=layout.tp_rank)
    model.eval()
    logits = full_logits(model, micro_batches, hf["vocab_size"])
    shutdown()
    return logits if layout.is_last_stage and layout.tp_rank == 0 else None


CASES = [
    ("qwen3-tiny", 1, 1), ("qwen3-tiny", 2, 1), ("qwen3-tiny", 1, 2), ("qwen3-tiny", 2, 2),
    ("qwen3-tiny-untied", 1, 1), ("qwen3-tiny-untied", 2, 2),
]


@pytest.mark.multiproc
@pytest.mark.parametrize("name,tp,pp", CASES)
def test_megatron_logits_equal_hf(name, tp, pp):
    hf = tiny_hf_config(name)
    hf_model = tiny_hf_model(hf)
    micro_batches = [random_tokens(hf, seed=1), random_tokens(hf, seed=2)]
    with torch.no_grad():
        expected = [hf_model(t).logits.float() for t in micro_batches]
    results = run_local(megatron_logits, tp * pp, hf, hf_state_dict(hf_model), micro_batches, tp, pp)
    got = [r for r in results if r is not None]
    assert len(got) == 1 and len(got[0]) == len(expected)
    for g, e in zip(got[0], expected):
        assert g.shape == e.shape
        assert e.abs().max() > 1.0  # the comparison is not between near-zero logits
        assert (g - e).abs().max().item() < TOL
