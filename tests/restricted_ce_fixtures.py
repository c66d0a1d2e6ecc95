"""Shared helpers of the restricted cross entropy tests: ragged candidate cases, float64 references, gradients."""
from __future__ import annotations

import torch

from replay_megatron.ops import restricted_cross_entropy


def fused_step(hidden, weight, candidates, targets, initial, **kwargs):
    """(loss, dh, main_grad increment, weight.grad) of one backward with weight.main_grad = initial."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    w.main_grad = initial.clone()
    loss = restricted_cross_entropy(h, w, candidates, targets, **kwargs)
    (loss * torch.linspace(0.5, 1.5, loss.shape[0])).sum().backward()
    return loss.detach(), h.grad, w.main_grad - initial, w.grad




def make_case(seed: int, n: int = 37, h: int = 24, v: int = 53, c: int = 9, dtype=torch.float32):
    """Ragged candidate sets (-1 padded, shuffled), ~1/6 K=1 rows, ~1/7 ignored rows, one all-padding row."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) / h ** 0.5).to(dtype)
    weight = (3 * torch.randn(v, h, generator=g)).to(dtype)
    candidates = torch.full((n, c), -1, dtype=torch.long)
    targets = torch.empty(n, dtype=torch.long)
    for i in range(n):
        k = 1 if i % 6 == 1 else int(torch.randint(1, c + 1, (1,), generator=g))
        ids = torch.randperm(v, generator=g)[:k]
        candidates[i, torch.randperm(c, generator=g)[:k]] = ids  # padding interleaved, not only trailing
        targets[i] = ids[int(torch.randint(0, k, (1,), generator=g))]
    targets[3::7] = -1
    candidates[3:4] = -1  # an ignored row with no candidate at all (when n > 3)
    teacher = 2 * torch.randn(n, c, generator=g)
    return hidden, weight, candidates, targets, teacher


def reference_log_probs(hidden, weight, candidates):
    """float64 brute force: full logits, candidate columns, log-softmax over each candidate set."""
    logits = hidden.double() @ weight.double().T  # [N, V]
    z = logits.gather(1, candidates.clamp(min=0)).masked_fill(candidates < 0, float("-inf"))
    return torch.log_softmax(z, dim=1)


def reference_ce(hidden, weight, candidates, targets):
    logp = reference_log_probs(hidden, weight, candidates)
    gold = (candidates == targets[:, None]).double()
    return torch.where(targets >= 0, -(gold * logp.nan_to_num(0.0, neginf=0.0)).sum(1), 0.0)


def reference_kl(hidden, weight, candidates, targets, teacher):
    """float64 KL(teacher || student), both softmaxed over the candidate set only."""
    logp = reference_log_probs(hidden, weight, candidates)
    log_q = torch.log_softmax(teacher.double().masked_fill(candidates < 0, float("-inf")), dim=1)
    terms = torch.where(candidates >= 0, log_q.exp() * (log_q - logp), 0.0)
    return torch.where(targets >= 0, terms.sum(1), 0.0)


def loss_and_grads(fn, hidden, weight, *args, upstream=None, **kwargs):
    """Loss [N] and d(sum upstream * loss)/d(hidden, weight); upstream defaults to a ramp (not all ones)."""
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(hidden, weight, *args, **kwargs)
    if upstream is None:
        upstream = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)
    dh, dw = torch.autograd.grad((loss * upstream).sum(), [hidden, weight])
    return loss.detach(), dh, dw


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against the reference b."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


