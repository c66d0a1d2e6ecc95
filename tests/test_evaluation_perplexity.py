"""evaluation.perplexity and evaluation.distance on megatron-core at TP1, TP2, PP2 and DP2 against references
computed from the same weights in transformers / plain torch.

Tolerances: perplexity's per-token mean loss within 1e-5 of the HF reference (fp32 model; the difference is
fp32 reduction order); relative L2 within 1e-10 relative (float64 sums on both sides).
"""
import math

import pytest

from qwen3_fixtures import hf_state_dict
from replay_megatron.platform.spawn import run_local
from evaluation_fixtures import LOSS_TOL, SEQ, hf_pair, hf_reference_loss, reference_distance, write_eval_store











def eval_on_rank(hf, base_sd, ft_sd, store, tp, pp, max_batches):
    """(perplexity of base, perplexity of ft, relative L2) on this rank of a TP x PP (x DP) job."""
    from replay_megatron.data.token_store import TokenDataset
    from replay_megatron.evaluation.distance import relative_l2_distance
    from replay_megatron.evaluation.perplexity import evaluate_perplexity
    from replay_megatron.models.conversion import load_hf_into_model
    from replay_megatron.models.qwen3 import build_model, transformer_config
    from replay_megatron.platform.distributed import initialize, shutdown

    layout = initialize(device="cpu", tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    models = []
    for sd in (base_sd, ft_sd):
        model = build_model(hf, transformer_config(hf, tp=tp, pp=pp), pre_process=layout.is_first_stage,
                            post_process=layout.is_last_stage, vocab_divisible_by=128)
        load_hf_into_model(model, sd, hf, tp=tp, tp_rank=layout.tp_rank)
        models.append(model.eval())
    dataset = TokenDataset(store)
    ppl = [evaluate_perplexity(m, dataset, seq_length=SEQ, micro_batch_size=2, max_batches=max_batches,
                               layout=layout, vocab_size=hf["vocab_size"]) for m in models]
    distance = relative_l2_distance(models[1], models[0])
    shutdown()
    return ppl[0], ppl[1], distance


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, base, ft = hf_pair()
    store = tmp_path_factory.mktemp("eval") / "heldout"
    samples = write_eval_store(store, hf)
    return {"hf": hf, "base": base, "ft": ft, "store": str(store), "samples": samples,
            "base_sd": hf_state_dict(base), "ft_sd": hf_state_dict(ft)}


def _check(setup, results, max_batches):
    samples = setup["samples"][: None if max_batches is None else 2 * max_batches]
    expected = [hf_reference_loss(setup[k], samples) for k in ("base", "ft")]
    distance = reference_distance(setup["ft"], setup["base"])
    for rank, (base_ppl, ft_ppl, d) in enumerate(results):
        for got, (loss, count) in zip((base_ppl, ft_ppl), expected):
            assert got["tokens"] == count, f"rank {rank}"
            assert abs(got["eval_loss"] - loss) < LOSS_TOL, f"rank {rank}: {got['eval_loss']} vs HF {loss}"
            assert got["perplexity"] == pytest.approx(math.exp(got["eval_loss"]), rel=1e-12)
        assert d == pytest.approx(distance, rel=1e-10), f"rank {rank}"
    assert expected[0][0] != pytest.approx(expected[1][0], abs=1e-3)  # the two models really differ


def test_tp1_matches_hf(setup):
    """One process, vocab 500 padded to 512 (padding columns masked), a short last micro-batch."""
    results = run_local(eval_on_rank, 1, setup["hf"], setup["base_sd"], setup["ft_sd"], setup["store"], 1, 1, None)
    _check(setup, results, None)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp,max_batches", [(2, 1, None), (1, 2, None), (1, 1, 2)],
                         ids=["tp2", "pp2-tied-embedding", "dp2-max-batches"])
def test_two_ranks_match_hf(setup, tp, pp, max_batches):
    """TP2 (norm weights duplicated over TP), PP2 (the tied embedding on both stages) and DP2 (samples split
    over replicas, max_batches counted over the whole set) give the single-process numbers on every rank."""
    results = run_local(eval_on_rank, 2, setup["hf"], setup["base_sd"], setup["ft_sd"], setup["store"], tp, pp,
                        max_batches)
    _check(setup, results, max_batches)
