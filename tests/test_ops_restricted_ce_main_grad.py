"""The op's weight gradient into megatron DDP's main_grad buffer, and the optional KL term of Stage 1.

- main_grad: with `weight.main_grad` the op adds dW into that buffer and gives the weight no autograd
  gradient; the increment must equal the dense autograd gradient (1e-6), rows no candidate touches must
  stay bit-identical, for both PyTorch paths and dW blocks that do not divide V. Under megatron-core's own
  DistributedDataParallel (one gloo process), tied (embedding lookup + op on one weight: both
  contributions) and untied, main_grad after two micro-batches equals plain autograd.
- KL: CE + w * KL equals the float64 brute force of both terms, through the op and through the replay
  output head (training/replay_head.py) with teacher logits from `replay_targets(..., with_teacher=True)`.
"""
from __future__ import annotations

import importlib
import re

import pytest
import torch

from replay_megatron.ops import restricted_ce_with_kl, restricted_cross_entropy
from replay_megatron.platform.spawn import run_local
from restricted_ce_fixtures import loss_and_grads, make_case, reference_ce, reference_kl, rel_err
from restricted_ce_fixtures import fused_step

# the module, not the function of the same name that replay_megatron.ops exports
rce = importlib.import_module("replay_megatron.ops.restricted_cross_entropy")




@pytest.mark.parametrize("block_rows", [5, None])  # 5: blocks of dW rows not dividing V = 53
def test_main_grad_increment_equals_the_dense_gradient(block_rows, torch_path, monkeypatch):
    hidden, weight, candidates, targets, _ = make_case(0)
    if block_rows:
        monkeypatch.setattr(rce, "_WGRAD_BLOCK_BYTES", 4 * hidden.shape[1] * block_rows)
    initial = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))  # earlier micro-batches
    loss, dh, increment, grad = fused_step(hidden, weight, candidates, targets, initial)
    dense = loss_and_grads(restricted_cross_entropy, hidden, weight, candidates, targets)
    assert grad is None
    assert torch.equal(loss, dense[0]) and torch.equal(dh, dense[1])
    assert rel_err(increment, dense[2]) < 1e-6
    touched = torch.zeros(weight.shape[0], dtype=torch.bool)
    touched[candidates[(targets >= 0)[:, None] & (candidates >= 0)]] = True
    assert (~touched).any() and torch.all(increment[~touched] == 0)


def test_fuse_main_grad_false_gives_the_dense_gradient_and_leaves_main_grad_alone():
    hidden, weight, candidates, targets, _ = make_case(1)
    initial = torch.zeros(weight.shape)
    _, _, increment, grad = fused_step(hidden, weight, candidates, targets, initial, fuse_main_grad=False)
    dense = loss_and_grads(restricted_cross_entropy, hidden, weight, candidates, targets)
    assert torch.all(increment == 0) and torch.equal(grad, dense[2])


def test_bf16_weight_accumulates_fp32_rows_into_an_fp32_main_grad():
    hidden, weight, candidates, targets, _ = make_case(2, dtype=torch.bfloat16)
    _, _, increment, grad = fused_step(hidden, weight, candidates, targets, torch.zeros(weight.shape))
    ref = loss_and_grads(reference_ce, hidden.double(), weight.double(), candidates, targets)
    assert grad is None and rel_err(increment, ref[2]) < 1e-6  # not rounded to bf16 as the dense grad is


def test_main_grad_of_another_shape_is_rejected():
    hidden, weight, candidates, targets, _ = make_case(3)
    with pytest.raises(ValueError, match="main_grad"):
        fused_step(hidden, weight, candidates, targets, torch.zeros(weight.shape[0] - 1, weight.shape[1]))


@pytest.mark.parametrize("kl_weight", [0.0, 0.3, 2.0])
def test_ce_plus_weighted_kl_matches_float64_reference(kl_weight, torch_path):
    hidden, weight, candidates, targets, teacher = make_case(4)
    got = loss_and_grads(restricted_ce_with_kl, hidden, weight, candidates, targets, teacher, kl_weight,
                         chunk_size=5)

    def reference(h, w, *args):
        return reference_ce(h, w, *args[:2]) + kl_weight * reference_kl(h, w, *args)

    ref = loss_and_grads(reference, hidden.double(), weight.double(), candidates, targets, teacher)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-6
    with pytest.raises(ValueError, match="kl_weight"):
        restricted_ce_with_kl(hidden, weight, candidates, targets, teacher, -0.1)


class _Record:
    def __init__(self, positions, targets, candidates, candidate_logits=None):
        self.positions, self.targets, self.candidates = positions, targets, candidates
        self.candidate_logits = candidate_logits


def _records(s: int, b: int, v: int, k: int):
    """Stored records of b samples (ragged widths, -inf teacher padding) and their labels [b, s]."""
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, v, (b, s), generator=g)
    records = {}
    for row in range(b):
        positions = torch.randperm(s, generator=g)[: 3 + 2 * row].sort().values
        width = k - row
        cands = torch.full((len(positions), width), -1, dtype=torch.long)
        for i, pos in enumerate(positions.tolist()):
            others = torch.randperm(v, generator=g)
            others = others[others != labels[row, pos]][: int(torch.randint(0, width, (1,), generator=g))]
            cands[i, : len(others) + 1] = torch.cat([labels[row, pos:pos + 1], others])
        logits = torch.randn(cands.shape, generator=g).masked_fill(cands < 0, float("-inf"))
        records[10 + row] = _Record(positions, labels[row, positions], cands, logits)
    return records, labels


class _Toy(torch.nn.Module):
    """hidden @ proj (+ the embedding lookup of `tokens` in the same weight when tied) -> the op on weight."""

    def __init__(self, case, tokens, tied: bool, detach_lookup: bool = False):
        super().__init__()
        self.hidden, _, self.candidates, self.targets, _ = case
        self.tokens, self.tied, self.detach_lookup = tokens, tied, detach_lookup
        self.weight = torch.nn.Parameter(case[1].clone())
        self.proj = torch.nn.Parameter(torch.eye(self.hidden.shape[1]))

    def forward(self):
        h = self.hidden @ self.proj
        if self.tied:
            h = h + torch.nn.functional.embedding(self.tokens, self.weight.detach() if self.detach_lookup else self.weight)
        return restricted_cross_entropy(h, self.weight, self.candidates, self.targets)


def _main_grad_under_megatron_ddp(case, tokens, tied: bool) -> dict[str, float]:
    """Relative error of DDP's main_grad after two micro-batches against plain autograd, per parameter
    (and, tied, against the op's share alone, which must differ)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  _Toy(case, tokens, tied))
    plain, op_only = _Toy(case, tokens, tied), _Toy(case, tokens, tied, detach_lookup=True)
    ddp.zero_grad_buffer()
    for _ in range(2):  # two micro-batches accumulate
        for model in (ddp, plain, op_only):
            model().sum().backward()
    ddp.finish_grad_sync()
    assert ddp.module.weight.grad is None
    errors = {name: rel_err(p.main_grad, getattr(plain, name).grad) for name, p in ddp.module.named_parameters()}
    errors["weight vs op share only"] = rel_err(ddp.module.weight.main_grad, op_only.weight.grad)
    return errors


def _segments(sample_ids, labels):
    """One sample per row of `labels`, filling it (GPTBatch.segments)."""
    return torch.tensor([[sid, row, 0, labels.shape[1]] for row, sid in enumerate(sample_ids)])


def _replay_layer_kl(kl_weight: float) -> tuple[float, bool, bool]:
    """(relative error of the replay output layer's CE + w * KL against float64, zero off the stored
    positions, teacher padding -inf exactly at candidate padding)."""
    from replay_megatron.training.replay_head import RestrictedCEHead, replay_targets

    s, b, v, h = 12, 3, 53, 24
    records, labels = _records(s, b, v, k=6)
    t = replay_targets(_segments(sorted(records), labels), labels, records.__getitem__, vocab_size=v, with_teacher=True)
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(s, b, h, generator=g) / h ** 0.5

    weight = torch.nn.Linear(h, v, bias=False).weight
    dense = RestrictedCEHead(t, kl_weight)(hidden, weight)
    w = weight.detach().double()
    h_sel = hidden[t.positions, t.rows].double()
    expected = reference_ce(h_sel, w, t.candidates, t.targets) + \
        kl_weight * reference_kl(h_sel, w, t.candidates, t.targets, t.teacher_logits)
    stored = torch.zeros(s, b, dtype=torch.bool)
    stored[t.positions, t.rows] = True
    return (rel_err(dense[t.positions, t.rows, 0], expected), bool(torch.all(dense[~stored] == 0)),
            torch.equal(torch.isinf(t.teacher_logits), t.candidates < 0))


def _in_megatron_process() -> dict:
    from replay_megatron.platform.distributed import initialize, shutdown

    initialize(device="cpu", tp=1, pp=1)
    case = make_case(5)
    tokens = torch.randint(0, case[1].shape[0], (case[0].shape[0],), generator=torch.Generator().manual_seed(6))
    out = {"tied": _main_grad_under_megatron_ddp(case, tokens, True),
           "untied": _main_grad_under_megatron_ddp(case, tokens, False),
           "kl": _replay_layer_kl(0.7)}
    shutdown()
    return out


@pytest.mark.multiproc
def test_megatron_ddp_main_grad_and_replay_layer_kl():
    (out,) = run_local(_in_megatron_process, 1)
    for tied in ("tied", "untied"):
        assert out[tied]["weight"] < 1e-6 and out[tied]["proj"] < 1e-6, out
    assert out["tied"]["weight vs op share only"] > 0.1, out  # the lookup's gradient reached main_grad too
    err, zero_elsewhere, padding_consistent = out["kl"]
    assert err < 1e-6 and zero_elsewhere and padding_consistent


def test_kl_needs_teacher_logits():
    from replay_megatron.training.objectives import RestrictedCE
    from replay_megatron.training.replay_head import RestrictedCEHead, replay_targets

    records, labels = _records(8, 2, 20, k=4)
    no_logits = {i: _Record(r.positions, r.targets, r.candidates) for i, r in records.items()}
    with pytest.raises(ValueError, match="sample 10 has no candidate_logits"):
        replay_targets(_segments([10, 11], labels), labels, no_logits.__getitem__, vocab_size=20, with_teacher=True)
    t = replay_targets(_segments([10, 11], labels), labels, no_logits.__getitem__, vocab_size=20)
    assert t.teacher_logits is None
    with pytest.raises(ValueError, match="kl_weight > 0 needs the teacher"):
        RestrictedCEHead(t, kl_weight=0.5)
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        RestrictedCE(kl_weight=-1.0)


@pytest.mark.parametrize("corrupt, message", [
    (lambda c: c.masked_fill(c == c[:, :1], -1), "not among its candidates"),  # the gold dropped
    (lambda c: torch.where(c >= 0, c + 20, c), "outside [0, 20)"),
    (lambda c: torch.cat([c[:, :1], c], dim=1), "duplicate candidate id"),
])
def test_replay_targets_refuse_broken_candidate_sets_on_the_host(corrupt, message):
    """The join checks Stage 0's invariants where it builds the targets, so the loss skips its device check."""
    from replay_megatron.training.replay_head import replay_targets

    records, labels = _records(8, 2, 20, k=4)
    bad = {i: _Record(r.positions, r.targets, corrupt(r.candidates)) for i, r in records.items()}
    assert replay_targets(_segments([10, 11], labels), labels, records.__getitem__, vocab_size=20).num_positions > 0
    with pytest.raises(ValueError, match=re.escape(message)):
        replay_targets(_segments([10, 11], labels), labels, bad.__getitem__, vocab_size=20)
