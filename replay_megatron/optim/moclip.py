"""MoClip: momentum-clipped Adam with the atan2 update (SPEC.md section 3), as a `torch.optim.Optimizer`.

One step:
1. global sums `d = <m_{t-1}, g>`, `mm = |m_{t-1}|^2`, `gg = |g|^2` over the parameters this rank counts
   (`counts_toward_stats`, default all), then `stats_reducer` (one collective in distributed runs);
2. the angle clip as two global scalars, `g' = alpha*g + beta*m_{t-1}` (`clip.clip_coefficients`);
3. `m = b1 m + (1-b1) g'`, `v = b2 v + (1-b2) g'^2`;
4.-6. `theta *= 1 - lr*weight_decay`, then `theta -= lr*a*atan2(mhat, b*sqrt(vhat))` (no epsilon).
With `eps` set, step 6 is Adam's division `mhat/(sqrt(vhat)+eps)` ("MoClip without atan2"); with
`max_angle=180` nothing is clipped (Adam-atan2; in paper mode already from 90 degrees on).

The optimizer works on whatever tensors it is given, whole parameters or distributed-optimizer shards:
every operation is elementwise except the three sums. State is fp32 whatever the parameter dtype, and is
laid out like `torch.optim.Adam` (`step`, `exp_avg`, `exp_avg_sq`), the keys megatron-core's
distributed-optimizer checkpointing expects. The step count `t` is each parameter's `step` (equal for
all parameters unless some had no gradient on some step; parameters without a gradient are skipped, as
torch's optimizers do).

Three code paths: the Triton kernels (`kernels/moclip.py`: one pass over memory for the sums, one for the
update; the default on CUDA/NPU when triton imports), the multi-tensor path (`torch._foreach_*`) and the
per-tensor path (the default on CPU, block by block). The two PyTorch paths run the same ops on the same
sums (equal to the last bit up to CPU kernels' scalar tails); the kernels agree with them to rounding.

Precision: partial sums are fp32 reductions accumulated across tensors and ranks in float64; the clip
scalars are float64, applied to fp32 tensors. On accelerators the fp32 reductions are whole tensors
(tree reductions); on CPU, whose fp32 reductions lose precision with length (|g|^2 of a 16M-element
tensor is off by 1e-3 relative), they are `torch.dot` over blocks of `CPU_BLOCK_NUMEL` elements, which
also reads g and m once for all three sums.

On accelerators the step never synchronises with the host: the scalars stay on the device, g' is built
whenever clipping is possible (alpha = 1, beta = 0 when it did not fire) and `last_stats` holds tensors (call
`MoClipStats.as_floats()`, which syncs, only when logging). On CPU, where reading a flag costs nothing,
building g' is skipped on steps that do not clip.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from replay_megatron.optim.clip import AngleClip, check_clip_args, clip_coefficients, never_clips
from replay_megatron.optim.elementwise import (CPU_BLOCK_NUMEL, bias_corrections, decoupled_update_, each,
                                               fused_kernels, local_sums, run_closure)

StatsReducer = Callable[[Tensor], Tensor]

@dataclass
class MoClipStats:
    """Statistics of the last step and running counts, as tensors on the statistics device."""

    cos_phi: Tensor  # NaN on the first step or when m or g is zero
    clipped: Tensor  # bool: the cap was active
    opposite: Tensor  # bool, rotate mode only: g exactly opposite m, g' = 0
    grad_norm: Tensor  # |g| over the whole (logical) model
    clipped_grad_norm: Tensor  # |g'|
    steps: int  # steps taken by this optimizer (running, since construction or load_state_dict)
    clipped_steps: Tensor  # running count of steps where clipping fired
    opposite_steps: Tensor  # running count of exactly-opposite events

    @property
    def clip_rate(self) -> Tensor:
        """Fraction of steps so far on which clipping fired."""
        return self.clipped_steps.double() / max(self.steps, 1)

    def as_floats(self) -> dict[str, float]:
        """Plain numbers for a logger (this synchronises with the device)."""
        names = ("cos_phi", "clipped", "opposite", "grad_norm", "clipped_grad_norm", "clipped_steps",
                 "opposite_steps")
        values = torch.stack([getattr(self, n).double() for n in names] + [self.clip_rate]).tolist()
        return {**dict(zip(names + ("clip_rate",), values)), "steps": float(self.steps)}


@dataclass
class _Bucket:
    """Parameters of one param group, device, dtype and code path: the unit of a multi-tensor call."""

    group: dict
    path: str  # "fused" (Triton kernels), "foreach" (multi-tensor) or "per-tensor"
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)  # fp32 (a copy for low-precision params)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)  # t of this step, per parameter
    counted: list[bool] = field(default_factory=list)

    def blocks(self, block_numel: Optional[int]) -> list["_Bucket"]:
        """One bucket per tensor, or per flat block of at most `block_numel` elements of a contiguous one,
        so that the per-tensor path finishes a block before the next (on CPU its data then stays in cache
        between the update's ops). The update is elementwise: blocks give the same numbers."""
        block_numel = block_numel or max(p.numel() for p in self.params)
        parts = []
        for *row, t, counted in zip(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps,
                                    self.counted):
            numel = row[0].numel()
            if numel <= block_numel or not all(x.is_contiguous() for x in row):
                pieces = [row]
            else:
                flat = [x.view(-1) for x in row]
                pieces = [[x[i:i + block_numel] for x in flat] for i in range(0, numel, block_numel)]
            parts += [_Bucket(self.group, "per-tensor", *([x] for x in piece + [t, counted])) for piece in pieces]
        return parts


class MoClip(torch.optim.Optimizer):
    """MoClip (SPEC.md section 3): one global gradient-momentum angle clip, Adam moments, atan2 update.

    `max_angle` (degrees) and `mode` are optimizer-wide, as the angle is global; `lr`, `betas`,
    `weight_decay`, `atan2_a`, `atan2_b` and `eps` may differ per param group. `stats_reducer` combines
    the local sums across ranks (e.g. `stats.GlobalSumsReducer`); `counts_toward_stats(param)` says
    whether this rank counts a parameter in them (e.g. `stats.counts_toward_global_stats`); every
    parameter is updated either way. `foreach` picks the multi-tensor path (`torch._foreach_*`, one call
    per op over all tensors) or the per-tensor path (the whole update on one tensor, then the next; on
    CPU on one block of `CPU_BLOCK_NUMEL` elements, then the next, reusing one buffer); the numbers are
    identical. Default (None): multi-tensor on accelerators, per-tensor on CPU, where it is faster (as
    torch's own optimizers default to foreach only off CPU). `fused` picks the Triton kernels: None = on
    CUDA/NPU when triton imports, True = required (on CPU only under TRITON_INTERPRET=1, for tests),
    False = never; low-precision or non-contiguous parameters always take a PyTorch path (megatron's
    mixed precision hands the optimizer fp32 main parameters).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, max_angle: float = 45.0, atan2_a: float = 1.0,
                 atan2_b: float = 1.0, mode: str = "paper", stats_reducer: Optional[StatsReducer] = None,
                 foreach: Optional[bool] = None, eps: Optional[float] = None,
                 counts_toward_stats: Optional[Callable[[Tensor], bool]] = None,
                 fused: Optional[bool] = None) -> None:
        check_clip_args(max_angle, mode)
        self.max_angle = float(max_angle)
        self.mode = mode
        self.stats_reducer = stats_reducer
        self.counts_toward_stats = counts_toward_stats
        self.foreach = foreach
        self.fused = fused
        self.last_stats: Optional[MoClipStats] = None
        self._steps = 0
        self._clipped_steps: Optional[Tensor] = None
        self._opposite_steps: Optional[Tensor] = None
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, atan2_a=atan2_a,
                        atan2_b=atan2_b, eps=eps)
        super().__init__(params, defaults)
        if fused:
            self._check_fused_available()

    def _check_fused_available(self) -> None:
        if fused_kernels() is None:
            raise ImportError("MoClip(fused=True) needs triton (the [triton] extra; triton-ascend on NPU)")
        on_cpu = any(p.device.type == "cpu" for g in self.param_groups for p in g["params"])
        if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("MoClip(fused=True) with CPU parameters runs only under TRITON_INTERPRET=1 "
                             "(tests); on CPU leave fused at None")

    def _path(self, param: Tensor, grad: Tensor) -> str:
        """Which code path updates `param` (see the class docstring)."""
        accelerator = param.device.type != "cpu"
        if (self.fused or (self.fused is None and accelerator)) and fused_kernels() is not None \
                and param.dtype == torch.float32 and param.is_contiguous() and grad.is_contiguous():
            return "fused"
        return "foreach" if (accelerator if self.foreach is None else self.foreach) else "per-tensor"

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        where = f"MoClip param group {len(self.param_groups) - 1}"
        b1, b2 = g["betas"]
        if g["lr"] < 0 or g["weight_decay"] < 0:
            raise ValueError(f"{where}: lr and weight_decay must be >= 0, got {g['lr']}, {g['weight_decay']}")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"{where}: betas must be in [0, 1), got {g['betas']}")
        if g["atan2_a"] <= 0 or g["atan2_b"] <= 0:
            raise ValueError(f"{where}: atan2_a and atan2_b must be > 0, got {g['atan2_a']}, {g['atan2_b']}")
        if g["eps"] is not None and (g["eps"] <= 0 or (g["atan2_a"], g["atan2_b"]) != (1.0, 1.0)):
            raise ValueError(f"{where}: eps (Adam division instead of atan2) must be > 0 and leaves "
                             f"atan2_a = atan2_b = 1, got eps={g['eps']}, a={g['atan2_a']}, b={g['atan2_b']}")

    # ---- the running clip counts: in state_dict(), and settable for a loop that saves them itself ----
    @property
    def clip_counts(self) -> dict[str, int]:
        """The running counts behind `last_stats.clip_rate`: {"steps", "clipped_steps", "opposite_steps"}.

        Saved by `state_dict()`. Settable for wrappers that load only `state` and `param_groups` into
        the inner optimizer (megatron's distributed optimizer: `optim.megatron.load_optimizer_state`
        sets them) and for a loop that checkpoints them itself. Reading synchronises with the device.
        """
        counts = [0, 0] if self._clipped_steps is None else \
            torch.stack([self._clipped_steps, self._opposite_steps]).tolist()
        return {"steps": self._steps, "clipped_steps": counts[0], "opposite_steps": counts[1]}

    @clip_counts.setter
    def clip_counts(self, counts: dict[str, int]) -> None:
        missing = {"steps", "clipped_steps", "opposite_steps"} - set(counts)
        if missing:
            raise ValueError(f"MoClip clip_counts: missing {sorted(missing)} in {counts}")
        steps, clipped, opposite = (int(counts[k]) for k in ("steps", "clipped_steps", "opposite_steps"))
        if not 0 <= opposite <= clipped <= steps:
            raise ValueError(f"MoClip clip_counts: need 0 <= opposite_steps <= clipped_steps <= steps, got {counts}")
        device = self._stats_device()
        self._steps = steps
        self._clipped_steps = torch.tensor(clipped, dtype=torch.int64, device=device)
        self._opposite_steps = torch.tensor(opposite, dtype=torch.int64, device=device)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["moclip_counts"] = self.clip_counts
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        counts = state_dict.pop("moclip_counts", None)
        super().load_state_dict(state_dict)
        # torch casts loaded state to the param dtype; MoClip's moments stay fp32 (bf16 params included).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for saved_id, p in zip(saved_ids, [p for g in self.param_groups for p in g["params"]]):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key in ("exp_avg", "exp_avg_sq"):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)
        self.clip_counts = counts or {"steps": 0, "clipped_steps": 0, "opposite_steps": 0}

    # ---- the step ----
    def _buckets(self) -> tuple[list[_Bucket], bool]:
        """Gather the tensors of this step; also whether it is the first step (t == 1 everywhere)."""
        buckets: dict[tuple, _Bucket] = {}
        first = True
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MoClip does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                t = float(state["step"]) + 1.0
                first = first and t == 1.0
                # A new tensor, not an in-place add: loaders may share one `step` tensor between params.
                state["step"] = torch.tensor(t)
                grad = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
                path = self._path(p, grad)
                b = buckets.setdefault((gi, p.device, p.dtype, path), _Bucket(group, path))
                b.params.append(p)
                b.grads.append(grad)
                b.exp_avgs.append(state["exp_avg"])
                b.exp_avg_sqs.append(state["exp_avg_sq"])
                b.steps.append(t)
                b.counted.append(self.counts_toward_stats is None or bool(self.counts_toward_stats(p)))
        return list(buckets.values()), first

    def _stats_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _local_sums(self, buckets: list[_Bucket], first: bool, device: torch.device) -> Tensor:
        """[d, mm, gg] over the counted tensors of this rank (`local_sums` per bucket, float64 across)."""
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for b in buckets:
            ms = [m for m, c in zip(b.exp_avgs, b.counted) if c]
            gs = [g for g, c in zip(b.grads, b.counted) if c]
            if gs:
                sums += (fused_kernels().global_sums(ms, gs, first) if b.path == "fused" else
                         local_sums(ms, gs, first, CPU_BLOCK_NUMEL)).to(device)
        return sums

    def _update(self, b: _Bucket, clip: Optional[tuple[Tensor, Tensor]],
                temps: Optional[list[Tensor]] = None) -> None:
        """SPEC section 3 steps 3-6 for one bucket. `clip` is fp32 (alpha, beta) of g' = alpha*g + beta*m,
        None for g' = g. `temps` (shaped like the grads) receive the step's one temporary; None: fresh."""
        fe, group = b.path == "foreach", b.group
        b1, b2 = group["betas"]
        lr, a, bb, eps = group["lr"], group["atan2_a"], group["atan2_b"], group["eps"]
        grads, exp_avgs, exp_avg_sqs = b.grads, b.exp_avgs, b.exp_avg_sqs
        if clip is None:
            clipped_grads = grads
        else:
            # One temporary, as AdamW's one (fresh memory is the dearest part of a CPU step): g' is built
            # in it with a broadcasting addcmul (0-dim beta, per tensor) and it then holds sqrt(v).
            alpha, beta = clip
            clipped_grads = each(fe, "mul", grads, alpha) if temps is None else \
                [torch.mul(g, alpha, out=u) for g, u in zip(grads, temps)]
            for g_clipped, m in zip(clipped_grads, exp_avgs):
                g_clipped.addcmul_(m, beta)
            temps = clipped_grads
        each(fe, "lerp_", exp_avgs, clipped_grads, 1.0 - b1)
        each(fe, "mul_", exp_avg_sqs, b2)
        each(fe, "addcmul_", exp_avg_sqs, clipped_grads, clipped_grads, value=1.0 - b2)
        bc1, bc2_sqrt = (list(c) for c in zip(*(bias_corrections(group["betas"], t) for t in b.steps)))
        denom = each(fe, "sqrt", exp_avg_sqs) if temps is None else \
            [torch.sqrt(v, out=u) for v, u in zip(exp_avg_sqs, temps)]
        if eps is None:
            # atan2(m/bc1, b*sqrt(v/bc2)) == atan2(m, c*sqrt(v)) with c = b*bc1/sqrt(bc2) > 0.
            each(fe, "mul_", denom, [bb * c1 / c2 for c1, c2 in zip(bc1, bc2_sqrt)])
            ratio = torch.atan2
        else:
            # (m/bc1) / (sqrt(v)/sqrt(bc2) + eps) == m / (bc1 * (sqrt(v)/sqrt(bc2) + eps))
            each(fe, "div_", denom, bc2_sqrt)
            each(fe, "add_", denom, eps)
            each(fe, "mul_", denom, bc1)
            ratio = torch.div
        for m, u in zip(exp_avgs, denom):  # no multi-tensor atan2 in torch: per tensor, in place
            ratio(m, u, out=u)
        decoupled_update_(b.params, denom, lr * a, lr * group["weight_decay"], foreach=fe)

    @staticmethod
    def _update_fused(b: _Bucket, clip: Optional[tuple[Tensor, Tensor]]) -> None:
        """The same steps as `_update`, one Triton launch per tensor."""
        group = b.group
        for p, g, m, v, t in zip(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.steps):
            bc1, bc2_sqrt = bias_corrections(group["betas"], t)
            fused_kernels().update_(
                p, g, m, v, clip, beta1=group["betas"][0], beta2=group["betas"][1],
                atan2_scale=group["atan2_b"] * bc1 / bc2_sqrt, bias_correction1=bc1,
                bias_correction2_sqrt=bc2_sqrt, eps=group["eps"], step_size=group["lr"] * group["atan2_a"],
                decay=group["lr"] * group["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = run_closure(closure)
        buckets, first = self._buckets()
        device = self._stats_device()
        sums = self._local_sums(buckets, first, device)
        if self.stats_reducer is not None:  # collective: every rank calls it, with or without params
            sums = self.stats_reducer(sums)
        clip = clip_coefficients(sums[0], sums[1], sums[2], self.max_angle, self.mode)
        # g' = g for sure: on the first step, with an angle that never clips, or when the (free on CPU)
        # flag says so. Skipping the build changes nothing (alpha = 1, beta = 0); on accelerators the flag
        # stays put.
        unclipped = (first or never_clips(self.max_angle, self.mode)
                     or (device.type == "cpu" and not bool(clip.clipped)))
        applied = None if unclipped else (clip.alpha.float(), clip.beta.float())
        for b in buckets:
            if b.path == "fused":
                self._update_fused(b, applied)
                continue
            if b.path == "foreach":
                self._update(b, applied)
                continue
            # Per-tensor path: block by block on CPU, all blocks sharing one buffer for the temporary.
            parts = b.blocks(CPU_BLOCK_NUMEL if b.params[0].device.type == "cpu" else None)
            buffer = torch.empty(max(p.grads[0].numel() for p in parts), dtype=torch.float32,
                                 device=b.grads[0].device)
            for part in parts:
                grad = part.grads[0]
                self._update(part, applied, [buffer[:grad.numel()].view(grad.shape)])
        self._record(clip, sums[2], device)
        return loss

    def _record(self, clip: AngleClip, gg: Tensor, device: torch.device) -> None:
        if self._clipped_steps is None:
            self._clipped_steps = torch.zeros((), dtype=torch.int64, device=device)
            self._opposite_steps = torch.zeros((), dtype=torch.int64, device=device)
        self._steps += 1
        self._clipped_steps += clip.clipped
        self._opposite_steps += clip.opposite
        self.last_stats = MoClipStats(
            cos_phi=clip.cos_phi, clipped=clip.clipped, opposite=clip.opposite, grad_norm=gg.sqrt(),
            clipped_grad_norm=clip.clipped_grad_norm, steps=self._steps,
            clipped_steps=self._clipped_steps.clone(), opposite_steps=self._opposite_steps.clone())
