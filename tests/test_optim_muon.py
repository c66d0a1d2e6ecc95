"""AdaMuon and Muon (optim.muon.MegatronMuon, megatron-core's TensorParallelMuon subclass) equal plain
single-tensor references written here over 10 steps (1e-6): AdaMuon as Si et al. 2025 define it
(Newton-Schulz of the sign of the momentum, element-wise second moment of the orthogonalised direction,
RMS matched to 0.2), Muon as megatron-core steps it (Newton-Schulz of the momentum, spectral scale).
Newton-Schulz itself is emerging-optimizers' (`newton_schulz`, fp32 matmuls at "highest"). MuonClip's
attention clip (optim.attention_clip) scales exactly the attention layers' gradients to the clip norm.
"""
from __future__ import annotations

import math

import pytest
import torch

from moclip_fixtures import backward, make_mlp

TOL = 1e-6
STEPS = 10
NS_STEPS = 5


def _newton_schulz(x: torch.Tensor) -> torch.Tensor:
    from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz

    return newton_schulz(x.float(), NS_STEPS, "quintic").double()


def adamuon_reference(theta, g, state, *, lr, momentum, beta2, eps, weight_decay):
    m = momentum * state.get("m", torch.zeros_like(g)) + (1 - momentum) * g
    o = _newton_schulz(m.sign())
    v = beta2 * state.get("v", torch.zeros_like(g)) + (1 - beta2) * o * o
    state.update(m=m, v=v)
    u = o / (v.sqrt() + eps)
    u = u * (0.2 * math.sqrt(u.numel()) / u.norm())
    return theta * (1 - lr * weight_decay) - lr * u


def muon_reference(theta, g, state, *, lr, momentum, beta2, eps, weight_decay):
    m = momentum * state.get("m", torch.zeros_like(g)) + (1 - momentum) * g
    state.update(m=m)
    return theta * (1 - lr * weight_decay) - lr * _newton_schulz(m) * math.sqrt(max(m.shape))


@pytest.mark.parametrize("adaptive", [True, False])
def test_muon_family_equals_reference(adaptive):
    from replay_megatron.optim.muon import MegatronMuon

    kwargs = dict(lr=0.02, momentum=0.95, beta2=0.999, eps=1e-8, weight_decay=0.1)
    model = make_mlp()
    weights = [p for p in model.parameters() if p.dim() == 2]
    opt = MegatronMuon(weights, lr=kwargs["lr"], momentum_beta=kwargs["momentum"],
                       weight_decay=kwargs["weight_decay"], fp32_matmul_prec="highest", adaptive=adaptive,
                       beta2=kwargs["beta2"], eps=kwargs["eps"])
    reference = adamuon_reference if adaptive else muon_reference
    thetas = [p.detach().double().clone() for p in weights]
    states: list[dict] = [{} for _ in weights]
    for step in range(STEPS):
        backward(model, step)
        thetas = [reference(t, p.grad.double(), s, **kwargs) for t, p, s in zip(thetas, weights, states)]
        opt.step()
    for p, theta, p0 in zip(weights, thetas, [w.detach() for w in make_mlp().parameters() if w.dim() == 2]):
        assert (p.detach() - p0).abs().max() > 1e-2  # it moved
        torch.testing.assert_close(p.detach().double(), theta, rtol=0, atol=TOL)


def _clip_attention(hf) -> dict:
    """AttentionGradClip on a one-rank megatron stage whose main_grads are random: the norm it measured,
    and every main_grad before and after a clip to half that norm."""
    from replay_megatron.optim.attention_clip import AttentionGradClip
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.training.setup import build_ddp_model

    layout = initialize(device="cpu", tp=1, pp=1, num_layers=hf["num_hidden_layers"])
    model = build_ddp_model(hf, layout, distributed_optimizer=False)
    gen = torch.Generator().manual_seed(0)
    before = {}
    for name, p in model.module.named_parameters():
        p.main_grad.copy_(torch.randn(p.shape, generator=gen))
        before[name] = p.main_grad.clone()
    attention = [before[n] for n in before if ".self_attention." in n]
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in attention])).item()
    clip = AttentionGradClip([model], max_norm=norm / 2)
    measured = clip()
    after = {n: p.main_grad.clone() for n, p in model.module.named_parameters()}
    shutdown()
    return dict(norm=norm, measured=measured, before=before, after=after)


def test_attention_clip_scales_attention_gradients_only():
    from replay_megatron.platform.spawn import run_local
    from train_fixtures import tiny_model_and_steps

    hf, _, _ = tiny_model_and_steps(1)
    [out] = run_local(_clip_attention, 1, hf)
    assert out["measured"] == pytest.approx(out["norm"], rel=1e-6)
    names = list(out["before"])
    assert any(".self_attention.linear_qkv." in n for n in names) and any(".mlp." in n for n in names)
    for name in names:
        factor = 0.5 if ".self_attention." in name else 1.0
        torch.testing.assert_close(out["after"][name], out["before"][name] * factor, rtol=1e-6, atol=0)
