"""evaluation.perplexity and evaluation.distance on megatron-core at TP1, TP2, PP2 and DP2 against references
computed from the same weights in transformers / plain torch.

Tolerances: perplexity's per-token mean loss within 1e-5 of the HF reference (fp32 model; the difference is
fp32 reduction order); relative L2 within 1e-10 relative (float64 sums on both sides).
"""
import math

import pytest
import torch

from qwen3_fixtures import hf_state_dict, tiny_hf_config, tiny_hf_model
from replay_megatron.platform.spawn import run_local

SEQ = 16
LOSS_TOL = 1e-5


def _hf_pair(vocab_size=500):
    """(hf config, base HF model, fine-tuned HF model); vocab 500 is padded to 512 by the megatron model."""
    hf = tiny_hf_config(vocab_size=vocab_size)
    base = tiny_hf_model(hf, seed=0)
    ft = tiny_hf_model(hf, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ft.parameters():  # the tied embedding/output weight is one parameter: perturbed once
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return hf, base, ft


def _write_store(path, hf, n=5):
    """A token store of `n` samples (lengths 6..SEQ+1, loss on the last two thirds of each)."""
    from replay_megatron.data.token_store import TokenStoreWriter

    g = torch.Generator().manual_seed(11)
    writer = TokenStoreWriter(path)
    samples = []
    for i in range(n):
        length = [SEQ + 1, 6, 11, SEQ, 9][i % 5]
        tokens = torch.randint(1, hf["vocab_size"], (length,), generator=g).tolist()
        mask = [0] * (length // 3) + [1] * (length - length // 3)
        writer.add(f"s{i}", tokens, mask)
        samples.append((tokens, mask))
    writer.close({"tokenizer": {"kind": "test", "fingerprint": "x", "vocab_size": hf["vocab_size"], "pad_id": 0,
                                "eos_id": 1}, "seq_length": SEQ})
    return samples


def _hf_reference_loss(model, samples):
    """Per-token mean next-token CE over loss-bearing tokens, one unpadded sample at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, mask in samples:
            ids = torch.tensor([tokens])
            logits = model(input_ids=ids).logits[0, :-1].double()
            ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            m = torch.tensor(mask[1:], dtype=torch.bool)
            total += ce[m].sum().item()
            count += int(m.sum())
    return total / count, count


def _reference_distance(ft, base):
    diff = sum((a.double() - b.double()).square().sum().item() for a, b in zip(ft.parameters(), base.parameters()))
    norm = sum(b.double().square().sum().item() for b in base.parameters())
    return math.sqrt(diff) / math.sqrt(norm)


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
    ppl = [evaluate_perplexity(m, dataset, seq_length=SEQ, micro_batch_size=2, max_batches=max_batches, pad_id=0,
                               layout=layout, vocab_size=hf["vocab_size"]) for m in models]
    distance = relative_l2_distance(models[1], models[0])
    shutdown()
    return ppl[0], ppl[1], distance


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, base, ft = _hf_pair()
    store = tmp_path_factory.mktemp("eval") / "heldout"
    samples = _write_store(store, hf)
    return {"hf": hf, "base": base, "ft": ft, "store": str(store), "samples": samples,
            "base_sd": hf_state_dict(base), "ft_sd": hf_state_dict(ft)}


def _check(setup, results, max_batches):
    samples = setup["samples"][: None if max_batches is None else 2 * max_batches]
    expected = [_hf_reference_loss(setup[k], samples) for k in ("base", "ft")]
    distance = _reference_distance(setup["ft"], setup["base"])
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
