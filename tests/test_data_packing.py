"""Sequence packing: best-fit rows, the packed batch layout token by token, the block-diagonal mask, and
per sample the same loss and gradients packed as alone in a row (full-vocabulary and replay objectives,
TP1 and TP2 x PP2, 1e-5)."""
import numpy as np
import pytest
import torch

from qwen3_fixtures import hf_state_dict, tiny_hf_config, tiny_hf_model
from replay_megatron.data.dataset import make_batch, make_rows_batch
from replay_megatron.data.packing import pack_lengths
from replay_megatron.models.qwen3 import causal_attention_mask, packed_attention_mask
from replay_megatron.platform.spawn import run_local

TOL = 1e-5


def test_pack_lengths_fills_rows_with_every_sample_once():
    positions = np.random.default_rng(0).integers(100, 1001, size=3000)
    packs = pack_lengths(positions, 4096)
    assert sorted(i for p in packs for i in p) == list(range(3000))
    assert all(positions[p].sum() <= 4096 for p in packs) and all(p == sorted(p) for p in packs)
    assert positions.sum() / (len(packs) * 4096) > 0.99  # vs ~0.14 with one sample per row
    assert pack_lengths(positions, 4096) == packs
    assert pack_lengths([3, 1, 2, 4], 4) == [[3], [0, 1], [2]]
    with pytest.raises(ValueError, match="sample 1 takes 5 positions, more than seq_length 4"):
        pack_lengths([1, 5], 4)


def _sample(sid, ids, mask):
    return {"sample_id": sid, "tokens": np.array(ids), "loss_mask": np.array(mask, dtype=np.uint8)}


def test_packed_row_layout_token_by_token():
    a, b, c, d = _sample(7, [11, 12, 13, 14], [0, 0, 1, 1]), _sample(3, [21, 22, 23], [0, 1, 1]), \
        _sample(5, [31, 32, 33, 34, 35, 36], [0, 0, 0, 1, 1, 1]), _sample(9, [41, 42], [0, 1])
    batch = make_rows_batch([[a, b, d], [c]], 7, pad_id=0)
    assert batch.tokens.tolist() == [[11, 12, 13, 21, 22, 41, 0], [31, 32, 33, 34, 35, 0, 0]]
    assert batch.labels.tolist() == [[12, 13, 14, 22, 23, 42, 0], [32, 33, 34, 35, 36, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]
    assert batch.segments.tolist() == [[7, 0, 0, 3], [3, 0, 3, 2], [9, 0, 5, 1], [5, 1, 0, 5]]
    assert batch.packed and batch.sample_ids.tolist() == [7, 3, 9, 5]
    alone = make_batch([a, b, d, c], 7, pad_id=0)  # each sample's columns are its unpacked row, moved
    assert not alone.packed and alone.segments.tolist() == [[7, 0, 0, 3], [3, 1, 0, 2], [9, 2, 0, 1], [5, 3, 0, 5]]
    for (_, row, start, n), (_, urow, _, _) in zip(batch.segments.tolist(), alone.segments.tolist()):
        for name in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(getattr(batch, name)[row, start:start + n], getattr(alone, name)[urow, :n])
    with pytest.raises(ValueError, match="sample 5 takes 5 positions, more than the 4 left in its row"):
        make_rows_batch([[a, c]], 7, pad_id=0)


def test_packed_attention_mask_is_causal_within_each_sample():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))])
    mask = packed_attention_mask(positions)
    segment = [[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8]
    for b in range(2):
        for q in range(8):
            for k in range(8):
                assert mask[b, 0, q, k] == (k > q or segment[b][q] != segment[b][k])
    assert torch.equal(mask[1:], causal_attention_mask(8))  # one sample per row: the plain causal mask


class _NoStep:
    """An optimizer that leaves the weights alone, so each pass sees the same model."""

    def zero_grad(self):
        pass

    def step(self):
        return True, 0.0, None


class _Record:
    def __init__(self, positions, targets, candidates):
        self.positions, self.targets, self.candidates = positions, targets, candidates


def _records(batch, vocab, k=5, seed=4):
    """Random candidate sets (gold included) at some loss positions of each sample, keyed by positions
    inside the sample: what Stage 0 stores."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for sid, row, start, n in batch.segments.tolist():
        loss = batch.loss_mask[row, start:start + n].nonzero().flatten()
        keep = loss[torch.rand(len(loss), generator=g) < 0.7]
        gold = batch.labels[row, start + keep]
        cands = torch.stack([torch.cat([t[None], torch.randperm(vocab, generator=g)[:k + 1][
            torch.randperm(vocab, generator=g)[:k + 1] != t][:k - 1]]) for t in gold]) if len(keep) else \
            torch.empty(0, k, dtype=torch.long)
        out[sid] = _Record(keep, gold, cands)
    return out


def packed_vs_alone(hf, sd, samples, s, tp, pp):
    """On each rank: per sample, (loss, this rank's gradient) alone in a row vs inside the packed rows with
    the loss on that sample only; returns the largest loss and gradient deviations and gradient size."""
    from replay_megatron.data.packing import pack_lengths as pack
    from replay_megatron.models.conversion import load_hf_into_model
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.training.objectives import FullVocabCE, ReplayMicroBatch, RestrictedCE
    from replay_megatron.training.replay_head import replay_targets
    from replay_megatron.training.setup import build_ddp_model
    from replay_megatron.training.step import train_step

    layout = initialize(device="cpu", tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    model = build_ddp_model(hf, layout)
    load_hf_into_model(model.module, sd, hf, tp=tp, tp_rank=layout.tp_rank)
    model.broadcast_params()
    packs = pack([len(x["tokens"]) - 1 for x in samples], s)
    assert len(packs) < len(samples)
    packed = make_rows_batch([[samples[i] for i in p] for p in packs], s, 0)
    records = _records(make_batch(samples, s, 0), hf["vocab_size"])

    def run(batch, replay):
        micro = ReplayMicroBatch(batch, replay_targets(batch.segments, batch.labels, records.__getitem__,
                                                       vocab_size=hf["vocab_size"])) if replay else batch
        result = train_step(model, _NoStep(), [micro], RestrictedCE() if replay else FullVocabCE())
        return result["loss"], torch.cat([b.grad_data.clone() for b in model.buffers])

    worst = {"loss": 0.0, "grad": 0.0, "grad_size": 0.0}
    for replay in (False, True):
        for k, sample in enumerate(samples):
            loss, grad = run(make_batch([sample], s, 0), replay)
            only_k = make_rows_batch([[samples[i] for i in p] for p in packs], s, 0)
            row, start, n = [seg[1:] for seg in packed.segments.tolist() if seg[0] == sample["sample_id"]][0]
            keep = torch.zeros_like(only_k.loss_mask)
            keep[row, start:start + n] = 1
            only_k.loss_mask *= keep
            if replay:
                records_k = dict(records)
                records.clear()
                records.update({sid: r if sid == sample["sample_id"] else _Record(r.positions[:0], r.targets[:0],
                                                                                  r.candidates[:0])
                                for sid, r in records_k.items()})
            loss_p, grad_p = run(only_k, replay)
            if replay:
                records.clear()
                records.update(records_k)
            worst["loss"] = max(worst["loss"], abs(loss - loss_p))
            worst["grad"] = max(worst["grad"], (grad - grad_p).abs().max().item())
            worst["grad_size"] = max(worst["grad_size"], grad.abs().max().item())
    shutdown()
    return worst


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_each_sample_trains_the_same_packed_as_alone(tp, pp):
    hf = tiny_hf_config("qwen3-tiny")
    sd = hf_state_dict(tiny_hf_model(hf))
    rng = np.random.default_rng(2)
    samples = []
    for sid in range(3):  # 4..7 positions each: one row holds all three
        length = int(rng.integers(5, 9))
        samples.append(_sample(100 + sid, rng.integers(1, hf["vocab_size"], length).tolist(),
                               [0] * (length // 3) + [1] * (length - length // 3)))
    for worst in run_local(packed_vs_alone, tp * pp, hf, sd, samples, 24, tp, pp):
        assert worst["grad_size"] > 1e-3  # the gradients are not trivially zero
        # relative to the largest gradient entry: RoPE rotates the packed samples by other angles (round-off)
        assert worst["loss"] < TOL and worst["grad"] < TOL * worst["grad_size"], worst
