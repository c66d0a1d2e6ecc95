"""AdaMuon and MuonClip in megatron-core's own Muon stack (optim.muon.build_muon_optimizer: MegatronMuon on
the 2-D transformer weights, AdamW on embeddings, output layer and 1-D tensors, megatron's wrappers):
5 steps of a tiny Qwen3 from the same weights against one process (fp32, Newton-Schulz at "highest"
precision, parameters within 1e-5).
- DP2, trained end to end: equal. (megatron-core's Muon refuses the distributed optimizer, so DP2 runs
  megatron's DDP with the optimizer replicated.)
- TP2xPP2 on the same gradients (the one-process run's, recorded before each step and put shard by
  shard into each main_grad; optimizer_equivalence_fixtures): equal. This is the optimizers' layout
  independence, the gated fc1's gathered rows put in logical order included.
- TP2xPP2 trained end to end: MuonClip equal. AdaMuon's first steps divide the orthogonalised direction
  by the root of its own square (U = O / (|O|*sqrt(1-b2) + eps)): an entry where O is within round-off
  of zero flips between about 0 and 1/sqrt(1-b2), and the model's own TP2 gradients differ from one
  process by fp32 reduction order. So there AdaMuon is checked as: at most 0.1% of the entries differ
  from one process by more than 1e-5.
MuonClip's attention clip binds on the steps here (the last step's attention norm is checked against it).
"""
import pytest

from optimizer_equivalence_fixtures import (TOL, changed_fractions, split_over_dp, step_on_recorded_gradients,
                                            train_variants)
from replay_megatron.platform.spawn import run_local
from train_fixtures import tiny_model_and_steps

STEPS = 5
CLIP = 0.05
# lr: an update RMS of about 1e-3 per step, as the Adam-based equivalence tests (AdaMuon matches RMS 0.2*lr,
# Muon's spectral scale gives RMS lr).
VARIANTS = {"adamuon": dict(name="adamuon", lr=5e-3, muon_matmul_precision="highest"),
            "muonclip": dict(name="muonclip", lr=1e-3, attention_clip_grad=CLIP, muon_matmul_precision="highest")}


def inspect_chain(variant, model, optimizer, before, kwargs) -> dict:
    """The inner optimizers of the chain, and MuonClip's attention gradient norm at the last step."""
    out = {f"{variant}_inner": [type(w.optimizer).__name__ for w in optimizer.chained_optimizers]}
    if variant == "muonclip":
        out["attention_norm"] = optimizer.attention_clip.last_norm
    return out


@pytest.fixture(scope="module")
def setup():
    hf, sd, steps = tiny_model_and_steps(STEPS)
    [ref] = run_local(train_variants, 1, VARIANTS, hf, sd, [steps], 1, 1, False, None, inspect_chain)
    for variant in VARIANTS:
        assert ref[f"{variant}_inner"] == ["MegatronMuon", "AdamW"]
        changed = changed_fractions(ref[variant], sd)
        assert changed["model.layers.0.self_attn.q_proj.weight"] == 1.0  # Muon moves every entry
    assert ref["attention_norm"] > 2 * CLIP
    return hf, sd, steps, ref


@pytest.mark.multiproc
def test_tp2_pp2_muon_family_equals_single_process(setup):
    hf, sd, steps, ref = setup
    for out in run_local(train_variants, 4, VARIANTS, hf, sd, [steps], 2, 2, False, ref, inspect_chain):
        assert out["muonclip"] < TOL, out
        assert out["adamuon_beyond_tol"] < 1e-3, out  # round-off of near-zero directions (see the module doc)


@pytest.mark.multiproc
def test_tp2_pp2_muon_family_on_the_same_gradients_equals_single_process(setup):
    hf, sd, _, ref = setup
    for out in run_local(step_on_recorded_gradients, 4, VARIANTS, hf, sd, ref, 2, 2):
        assert max(out[v] for v in VARIANTS) < TOL, out


@pytest.mark.multiproc
def test_dp2_muon_family_equals_single_process(setup):
    hf, sd, steps, ref = setup
    for out in run_local(train_variants, 2, VARIANTS, hf, sd, split_over_dp(steps, 2), 1, 1, False, ref, inspect_chain):
        assert max(out[v] for v in VARIANTS) < TOL, out
