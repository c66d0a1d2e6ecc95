"""One training step (megatron-core schedule, DDP, AdamW) at TP2 x PP2 == TP1 x PP1 (1e-5): the
full-vocabulary SFT objective and the Stage 1 replay objective (restricted CE on stored candidates)."""
import pytest
import torch

from qwen3_fixtures import hf_state_dict, tiny_hf_config, tiny_hf_model
from replay_megatron.platform.spawn import run_local
from train_fixtures import make_micro_batches, max_deviation

pytestmark = pytest.mark.mcore_compat  # CI also runs these on megatron-core 0.12.1 (README)

TOL = 1e-5




class FakeRecord:
    def __init__(self, positions, targets, candidates):
        self.positions, self.targets, self.candidates = positions, targets, candidates


def replay_micro_batches(hf, batches, k=6):
    """Stage 1 micro-batches: random candidate sets (gold included, ragged, -1 padded) at a subset of
    loss-bearing positions; one sample has no stored position at all."""
    from replay_megatron.training.objectives import ReplayMicroBatch
    from replay_megatron.training.replay_head import replay_targets

    g = torch.Generator().manual_seed(5)
    records = {}
    for batch in batches:
        for row, sid in enumerate(batch.sample_ids.tolist()):
            loss_positions = batch.loss_mask[row].nonzero().flatten()
            keep = loss_positions[torch.rand(len(loss_positions), generator=g) < (0.0 if sid == 0 else 0.6)]
            gold = batch.labels[row, keep]
            cands = torch.full((len(keep), k + 1), -1, dtype=torch.long)
            for i, t in enumerate(gold.tolist()):
                size = int(torch.randint(1, k + 1, (1,), generator=g))
                others = torch.randperm(hf["vocab_size"], generator=g)
                others = others[others != t][: size - 1]
                cands[i, :size] = torch.cat([torch.tensor([t]), others])[torch.randperm(size, generator=g)]
            records[sid] = FakeRecord(keep, gold, cands)
    return [ReplayMicroBatch(b, replay_targets(b.segments, b.labels, records.__getitem__,
                                               vocab_size=hf["vocab_size"])) for b in batches]


def train_one_step(hf, hf_sd, micro_batches, tp, pp, check_against=None, replay=False):
    """Returns (loss, HF state dict after the step) at TP1/PP1; elsewhere the max deviation from
    `check_against` (the TP1/PP1 result) over this rank's parameters and grads."""
    from replay_megatron.models.conversion import load_hf_into_model, model_to_hf
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.optim.megatron import build_optimizer
    from replay_megatron.training.setup import build_ddp_model
    from replay_megatron.training.step import train_step

    layout = initialize(device="cpu", tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    model = build_ddp_model(hf, layout)
    load_hf_into_model(model.module, hf_sd, hf, tp=tp, tp_rank=layout.tp_rank)
    model.broadcast_params()
    # eps well above gradient round-off: Adam's first step is ~lr*sign(g), which would turn fp32
    # reduction-order noise in near-zero gradients into O(lr) parameter differences.
    optimizer = build_optimizer("adamw", [model], lr=1e-2, weight_decay=0.1, clip_grad=1.0, eps=1e-3)
    from replay_megatron.training.objectives import FullVocabCE, RestrictedCE

    if replay:
        micro_batches = replay_micro_batches(hf, micro_batches)
    result = train_step(model, optimizer, micro_batches, RestrictedCE() if replay else FullVocabCE())
    if check_against is None:
        out = (result, model_to_hf(model.module, hf))
    else:
        out = (result, max_deviation(model.module, check_against, hf, layout))
    shutdown()
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("name,replay", [("qwen3-tiny", False), ("qwen3-tiny-untied", False),
                                         ("qwen3-tiny", True), ("qwen3-tiny-untied", True)])
def test_tp2_pp2_step_equals_single_process(name, replay):
    hf = tiny_hf_config(name)
    sd = hf_state_dict(tiny_hf_model(hf))
    batches = make_micro_batches(hf)
    [(ref_result, ref_sd)] = run_local(train_one_step, 1, hf, sd, batches, 1, 1, None, replay)
    assert ref_result["update_ok"] and ref_result["loss"] > 0
    # the step moved the weights: a comparison against the initial weights would fail
    assert max((ref_sd[k] - sd[k]).abs().max().item() for k in ref_sd) > 1e-3
    results = run_local(train_one_step, 4, hf, sd, batches, 2, 2, ref_sd, replay)
    for result, deviation in results:
        assert abs(result["loss"] - ref_result["loss"]) < TOL
        assert abs(result["grad_norm"] - ref_result["grad_norm"]) < TOL * max(1.0, ref_result["grad_norm"])
        assert deviation < TOL
