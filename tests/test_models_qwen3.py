"""Megatron Qwen3 == Hugging Face Qwen3ForCausalLM: fp32 logits within 1e-4 for TP in {1,2} x PP in {1,2}."""
import pytest
import torch

from qwen3_fixtures import hf_state_dict, random_tokens, tiny_hf_config, tiny_hf_model
from replay_megatron.models.parity import compare_logits, megatron_logits_on_rank
from replay_megatron.platform.spawn import run_local

pytestmark = pytest.mark.mcore_compat  # CI also runs these on megatron-core 0.12.1 (README)

TOL = 1e-4


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
    results = run_local(megatron_logits_on_rank, tp * pp, hf, hf_state_dict(hf_model), micro_batches, tp, pp)
    got = [r for r in results if r is not None]
    assert len(got) == 1
    assert min(e.abs().max().item() for e in expected) > 1.0  # not a comparison of near-zero logits
    report = compare_logits(expected, got[0], micro_batches)
    assert report.max_abs < TOL, report
