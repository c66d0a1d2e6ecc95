"""TAM and MoFO (SPEC.md section 4) equal per-tensor float64 references written here from the SPEC.

Each reference is fed the gradients the optimizer saw on a small MLP (so the optimizer math alone is
compared, tolerance 1e-6 on the parameters). MoFO's top-k selection is also checked on tensors full of
ties against a sort by (-|m|, index).
"""
from __future__ import annotations

import math

import pytest
import torch

from replay_megatron.optim import TAM, MoFO
from replay_megatron.optim.mofo import top_k_mask
from moclip_fixtures import backward, make_mlp

TOL = 1e-6
STEPS = 8


def run_with_reference(opt_cls, kwargs: dict, reference) -> None:
    model = make_mlp()
    params = list(model.parameters())
    opt = opt_cls(params, **kwargs)
    thetas = [p.detach().double().clone() for p in params]
    state: dict = {}
    for step in range(STEPS):
        backward(model, step)
        thetas = reference(thetas, [p.grad.double() for p in params], state, step + 1, **kwargs)
        opt.step()
    for p, theta in zip(params, thetas):
        torch.testing.assert_close(p.detach().double(), theta, rtol=0, atol=TOL)


def tam_reference(thetas, grads, state, t, *, lr, momentum, gamma, eps, weight_decay, cos_update):
    out = []
    for i, (theta, g) in enumerate(zip(thetas, grads)):
        m, sh = state.get(i, (torch.zeros_like(g), 0.0))
        norms = m.norm() * g.norm()
        s = (m.reshape(-1) @ g.reshape(-1) / norms).item() if norms > 0 else 0.0
        sh = gamma * sh + (1 - gamma) * s
        m = momentum * m + (eps + (1 + sh) / 2) * g
        state[i] = (m, sh)
        out.append(theta * (1 - lr * weight_decay) - lr * (s if cos_update else 1.0) * m)
    return out


@pytest.mark.parametrize("cos_update", [False, True])
def test_tam_equals_reference(cos_update):
    kwargs = dict(lr=0.05, momentum=0.9, gamma=0.9, eps=1e-8, weight_decay=0.1, cos_update=cos_update)
    run_with_reference(TAM, kwargs, tam_reference)


def reference_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    order = sorted(range(values.numel()), key=lambda i: (-values[i].item(), i))[:k]
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order] = True
    return mask


def mofo_reference(thetas, grads, state, t, *, lr, betas, eps, weight_decay, fraction):
    b1, b2 = betas
    out = []
    for i, (theta, g) in enumerate(zip(thetas, grads)):
        m, v = state.get(i, (torch.zeros_like(g), torch.zeros_like(g)))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        state[i] = (m, v)
        update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + weight_decay * theta
        if theta.dim() > 1:
            k = max(1, math.floor(theta.numel() * fraction))
            update = update * reference_top_k(m.abs().reshape(-1), k).view_as(theta)
        out.append(theta - lr * update)
    return out


@pytest.mark.parametrize("fraction", [0.2, 0.01])
def test_mofo_equals_reference(fraction):
    kwargs = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, fraction=fraction)
    run_with_reference(MoFO, kwargs, mofo_reference)


def test_mofo_leaves_unselected_entries_and_updates_1d_fully():
    model = make_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = MoFO(model.parameters(), lr=0.01, fraction=0.2, weight_decay=0.1)
    backward(model, 0)
    opt.step()
    for (name, p), p0 in zip(model.named_parameters(), before):
        changed = int((p.detach() != p0).sum())
        expected = p.numel() if p.dim() == 1 else max(1, math.floor(p.numel() * 0.2))
        assert changed == expected, name


@pytest.mark.parametrize("seed", range(5))
def test_top_k_mask_breaks_ties_by_index(seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 4, (37,), generator=gen).float()  # many ties at every threshold
    for k in (1, 5, 9, 20, 36, 37):
        mask = top_k_mask(values, k)
        assert int(mask.sum()) == k
        assert torch.equal(mask, reference_top_k(values, k))
    expected = torch.tensor([False, True, True, True, False, False])
    assert torch.equal(top_k_mask(torch.tensor([1.0, 3, 3, 3, 0, 3]), 3), expected)
