"""Restricted (renormalised) cross entropy of Logits Replay Stage 1 (SPEC.md section 2), vocab-parallel.

For a stored position t with candidate set S_t (gold x_t in S_t), final hidden state h_t and output
weight W:

    zr_j = h_t . W_j  (j in S_t only)          L_t = logsumexp_{j in S_t} zr_j - zr_{x_t}

Only the |S_t| candidate rows of W take part (sparse products on CPU, a gather per chunk of positions
elsewhere, or the Triton kernel), so no [N, V] (nor [N, V_local]) logits exist; backward uses the
[N, C] softmax kept from forward and never needs the logits again.

Vocab parallel (`tp_group` given): this rank holds rows `vocab_start .. vocab_start + V_local - 1` of W;
candidates outside them are masked locally. The ranks exchange per-position scalars only (SPEC.md
section 2): one MAX all-reduce of the local maxima [N], then one SUM all-reduce of the packed
[local sum-exp, local gold logit] [2, N].

Gradient contract under TP, as megatron-core's ColumnParallelLinear: `dh` is this rank's PARTIAL
sum_j dzr_j W_j over its own candidate rows. The caller must feed `hidden` through an op whose backward
all-reduces over TP, e.g. `megatron.core.tensor_parallel.copy_to_tensor_model_parallel_region(hidden)`
(what ColumnParallelLinear does to its input without sequence parallelism). `dW` lands on this rank's
rows only.

Weight gradient into megatron DDP's buffer (the analogue of megatron's gradient_accumulation_fusion):
when `weight` carries `main_grad` (DDP's view of its grad buffer), backward adds the candidate rows of dW
straight into it, a bounded block of vocabulary rows at a time, and returns no weight gradient, so no
dense [V_local, H] gradient ever exists. `grad_added_to_main_grad` is left alone: with a tied embedding
the lookup's dense gradient still arrives as `param.grad` and DDP's hook adds it to main_grad as usual.
Not with DDP's overlap_grad_reduce, whose hook requires a `param.grad` to mark the bucket ready: there
pass `fuse_main_grad=False` (dense gradient, DDP adds it; training/replay_head.py does this).
"""
from __future__ import annotations

import warnings
from typing import Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

_CHUNK_BYTES = 64 << 20  # default budget for one chunk's gathered fp32 candidate rows [chunk, C, H]
_WGRAD_BLOCK_BYTES = 8 << 20  # one block of fp32 dW rows [rows, H] computed before it is added to its target


class CandidateBackend(Protocol):
    """The two heavy steps of the op; everything between them (collectives, softmax) is shared torch."""

    def logits_and_stats(self, hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                         q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local candidate logits zr [N, C] fp32 (-inf where rows < 0) and, per position, the local
        max m, sum exp(zr - m) s (0 when no local candidate) and target-weighted logit sum(q * zr)."""

    def grads(self, dzr: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
              need_dh: bool, dw_out: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """dh [N, H] fp32 = sum_j dzr_j W_rows_j (None unless need_dh); and, when dw_out [V_local, H] (any
        float dtype) is given, dw_out[rows_j] += dzr_j h in place."""


def _local_softmax_stats(zr: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, sum exp(zr - max), sum q * zr) per row of masked logits zr (-inf = masked, q = 0 there)."""
    m = zr.amax(dim=1)
    s = torch.exp(zr - _finite_or_zero(m)[:, None]).sum(dim=1)
    gold = (q * torch.where(torch.isfinite(zr), zr, 0.0)).sum(dim=1)
    return m, s, gold


class TorchCandidates:
    """PyTorch path, made of the two sparse products the op is (SPEC.md section 2).

    - SDDMM, zr_tj = h_t . W_j on the candidate pattern: `torch.sparse.sampled_addmm`.
    - SpMM, sums of rows weighted per candidate: `F.embedding_bag` with per-sample weights, for
      dh_t = sum_j dzr_tj W_j (bags = positions over W's rows) and dW_j = sum_t dzr_tj h_t (bags = vocab
      rows over hidden's rows, in fp32 whatever the dtype, one block of vocabulary rows at a time added
      to its target, so at most _WGRAD_BLOCK_BYTES of dW exist at once).
    Neither forms more than O(N*C) besides its output. sampled_addmm and the dh bag compute in W's dtype
    and run on CPU, so for a non-fp32 W or another device, zr and dh come from fp32 copies of the
    candidate rows gathered `chunk_size` positions at a time (peak extra memory O(chunk_size * C * H)).
    Candidate ids must be ascending within each row (the op sorts them), as CSR wants.
    """

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    @staticmethod
    def _sparse_ok(weight: torch.Tensor) -> bool:
        return weight.dtype == torch.float32 and weight.device.type == "cpu"

    def logits_and_stats(self, hidden, weight, rows, q):
        live = rows >= 0
        if self._sparse_ok(weight):
            zr = torch.full(rows.shape, float("-inf"), dtype=torch.float32, device=hidden.device)
            if live.any():
                with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
                    warnings.simplefilter("ignore", UserWarning)
                    pattern = torch.sparse_csr_tensor(
                        _bag_offsets(live, closed=True), rows[live], torch.zeros(int(live.sum()), device=hidden.device),
                        size=(rows.shape[0], weight.shape[0]), check_invariants=False)
                zr[live] = torch.sparse.sampled_addmm(pattern, hidden.float(), weight.t(), beta=0.0).values()
        else:
            zr = torch.empty(rows.shape, dtype=torch.float32, device=hidden.device)
            for s, e, w in self._gathered_rows(weight, rows):
                zr[s:e] = torch.bmm(w, hidden[s:e].float().unsqueeze(-1)).squeeze(-1)
            zr.masked_fill_(~live, float("-inf"))
        return (zr, *_local_softmax_stats(zr, q))

    def grads(self, dzr, hidden, weight, rows, need_dh, dw_out):
        live = rows >= 0
        dh = None
        if need_dh and self._sparse_ok(weight):
            dh = F.embedding_bag(rows[live], weight, _bag_offsets(live), mode="sum", per_sample_weights=dzr[live])
        elif need_dh:
            dh = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
            for s, e, w in self._gathered_rows(weight, rows):
                dh[s:e] = torch.bmm(dzr[s:e].unsqueeze(1), w).squeeze(1)  # dzr is 0 where rows < 0
        if dw_out is not None:
            _add_weight_grad(dw_out, dzr, rows, hidden)
        return dh

    def _gathered_rows(self, weight, rows):
        """(start, end, fp32 [c, C, H] candidate rows of W) per chunk; row 0 stands in where rows < 0.
        One buffer serves every chunk (fresh large allocations cost a page fault per page on CPU)."""
        buf = weight.new_empty((min(self.chunk_size, rows.shape[0]) * rows.shape[1], weight.shape[1]))
        for s in range(0, rows.shape[0], self.chunk_size):
            r = rows[s:s + self.chunk_size]
            out = torch.index_select(weight, 0, r.clamp(min=0).reshape(-1), out=buf[:r.numel()])
            yield s, s + r.shape[0], out.view(*r.shape, -1).float()


def _add_weight_grad(dw_out: torch.Tensor, dzr: torch.Tensor, rows: torch.Tensor, hidden: torch.Tensor) -> None:
    """dw_out[rows_tj] += dzr_tj h_t (rows < 0 skipped), computed in fp32 per block of _WGRAD_BLOCK_BYTES
    of vocabulary rows (blocks without a candidate are skipped)."""
    live = rows >= 0
    vocab_rows, order = rows[live].sort()
    positions, dz, h = live.nonzero()[:, 0][order], dzr[live][order], hidden.float()
    v, block = dw_out.shape[0], max(1, _WGRAD_BLOCK_BYTES // (4 * hidden.shape[1]))
    starts = [min(a, v) for a in range(0, v + block, block)]
    bounds = torch.searchsorted(vocab_rows, torch.tensor(starts, device=rows.device)).tolist()  # one sync
    for a, lo, hi in zip(starts, bounds, bounds[1:]):
        if lo < hi:
            b = min(a + block, v)
            offsets = torch.searchsorted(vocab_rows[lo:hi], torch.arange(a, b, device=rows.device))
            dw_out[a:b] += F.embedding_bag(positions[lo:hi], h, offsets, mode="sum",
                                           per_sample_weights=dz[lo:hi]).to(dw_out.dtype)


def _bag_offsets(live: torch.Tensor, closed: bool = False) -> torch.Tensor:
    """Start of each row's live entries in row-major order ([N]; [N+1] with the end when closed, = CSR rows)."""
    starts = torch.cat([live.new_zeros(1, dtype=torch.long), live.sum(dim=1).cumsum(dim=0)])
    return starts if closed else starts[:-1]


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def _global_lse_and_target_logit(m: torch.Tensor, s: torch.Tensor, gold: torch.Tensor,
                                 tp_group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC.md section 2 collectives: MAX of the local maxima, then ONE SUM of [rescaled sum-exp, gold].

    Returns (lse, target logit, nonempty) per position; a row with no candidate on any rank (an ignored
    row) has nonempty False and lse 0.
    """
    m_glob = m.clone()
    if tp_group is not None:
        dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=tp_group)
    m_glob = _finite_or_zero(m_glob)
    packed = torch.stack([s * torch.exp(m - m_glob), gold])  # this rank's sum-exp rescaled to the global max
    if tp_group is not None:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
    s_glob, gold_glob = packed
    nonempty = s_glob > 0
    lse = torch.where(nonempty, m_glob + torch.log(torch.where(nonempty, s_glob, 1.0)), 0.0)
    return lse, gold_glob, nonempty


class _RestrictedCrossEntropy(torch.autograd.Function):
    """loss_t = lse_S(zr) - sum_j q_tj zr_j; backward dzr = softmax_S(zr) - q (SPEC.md section 2)."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, q, tp_group, backend: CandidateBackend, main_grad):
        zr, m, s, gold = backend.logits_and_stats(hidden, weight, rows, q)
        lse, gold, nonempty = _global_lse_and_target_logit(m, s, gold, tp_group)
        loss = torch.where(nonempty, lse - gold, 0.0)
        # softmax_S(zr) - q, kept [N, C] (O(N*C), like the candidate ids) so backward needs no logits again
        zr.sub_(lse[:, None]).exp_().sub_(q)
        ctx.save_for_backward(hidden, weight, rows, zr)
        ctx.backend, ctx.main_grad = backend, main_grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, rows, p_minus_q = ctx.saved_tensors
        dzr = p_minus_q * grad_loss.float().unsqueeze(1)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = ctx.main_grad if ctx.main_grad is not None else \
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        dh = ctx.backend.grads(dzr, hidden, weight, rows, ctx.needs_input_grad[0], dw)
        if ctx.main_grad is not None:
            dw = None  # already in the DDP grad buffer (module docstring)
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None, None, None, None, None)


def _check_shapes(hidden, weight, candidates, targets, target_probs) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"restricted_cross_entropy: hidden {tuple(hidden.shape)} must be [N, H] and weight "
                         f"{tuple(weight.shape)} [V_local, H] with the same H")
    n = hidden.shape[0]
    if candidates.dim() != 2 or candidates.shape[0] != n or targets.shape != (n,):
        raise ValueError(f"restricted_cross_entropy: candidates {tuple(candidates.shape)} must be [N, C] and "
                         f"targets {tuple(targets.shape)} [N] with N = {n}")
    if candidates.dtype.is_floating_point or targets.dtype.is_floating_point:
        raise ValueError("restricted_cross_entropy: candidates and targets must be integer token ids")
    if target_probs is not None and target_probs.shape != candidates.shape:
        raise ValueError(f"restricted_cross_entropy: target_probs {tuple(target_probs.shape)} must match "
                         f"candidates {tuple(candidates.shape)}")


def _check_candidates(candidates, targets, target_probs, lo: int, hi: int) -> None:
    """The invariants Stage 0 guarantees, on candidates sorted within each row; messages name the row.
    One host sync in all (a device flag), more only to name a failure."""
    pad = candidates == -1
    valid = targets >= 0
    checks = [((~pad & ((candidates < lo) | (candidates >= hi))).any(dim=1),
               f"has a candidate id outside [{lo}, {hi}) (padding is -1)"),
              (targets < -1, "has a target id below -1 (-1 marks an ignored row)"),
              (((candidates[:, 1:] == candidates[:, :-1]) & ~pad[:, 1:]).any(dim=1), "has a duplicate candidate id"),
              (valid & ~(candidates == targets[:, None]).any(dim=1),
               "has a target that is not among its candidates (Stage 0 always appends the gold)")]
    if target_probs is not None:
        mass = torch.where(pad, 0.0, target_probs.float()).sum(dim=1)
        checks.append((valid & ((mass - 1).abs() > 1e-4), "has target_probs on its candidates not summing to 1"))
    if bool(torch.stack([bad.any() for bad, _ in checks]).any()):
        for bad_rows, what in checks:
            if bool(bad_rows.any()):
                row = int(bad_rows.nonzero()[0, 0])
                raise ValueError(f"restricted_cross_entropy: row {row} {what} ({int(bad_rows.sum())} such rows)")


def validate_candidates(candidates: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> None:
    """Refuse candidate sets [N, C] (-1 padded) and targets [N] that break Stage 0's invariants (ids in
    [0, vocab_size), no duplicates, the gold among them): where they are built, e.g. on the host, so the
    op can skip its own check (`validate=False`) and its device sync."""
    _check_candidates(candidates.long().sort(dim=1)[0], targets.long(), None, 0, vocab_size)


def _select_backend(device: torch.device, backend: str, chunk_size: int) -> CandidateBackend:
    """'auto' = the Triton kernel on CUDA/NPU when triton imports, else the PyTorch path."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"restricted_cross_entropy: backend must be auto, torch or triton, not {backend!r}")
    if backend == "triton" or (backend == "auto" and device.type in ("cuda", "npu")):
        try:
            from replay_megatron_kernels.restricted_ce import TritonCandidates
        except ImportError:
            if backend == "triton":
                raise
        else:
            return TritonCandidates()
    return TorchCandidates(chunk_size)


def restricted_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, candidates: torch.Tensor,
                             targets: torch.Tensor, *, vocab_start: int = 0, tp_group=None,
                             chunk_size: Optional[int] = None, target_probs: Optional[torch.Tensor] = None,
                             backend: str = "auto", fuse_main_grad: bool = True,
                             validate: bool = True) -> torch.Tensor:
    """Per-position restricted cross entropy [N] (fp32) on the candidate sets (SPEC.md section 2).

    hidden [N, H]; weight [V_local, H], rows vocab_start.. of the global vocabulary; candidates [N, C]
    global ids padded with -1 (no duplicates); targets [N] global ids, -1 = ignored row (loss 0, no
    gradient). Computed in fp32 whatever the input dtype; gradients come back in the input dtypes.
    Reduction (per-token mean over the global batch) is the caller's.

    tp_group: the tensor-parallel group over which the vocabulary is split; the returned loss is the
    global one on every rank, dh is this rank's partial (see the module docstring).
    chunk_size: positions per chunk where the PyTorch path gathers W's rows (non-fp32 W or not on CPU;
    default: 64 MiB of gathered fp32 rows).
    target_probs: optional [N, C] distribution on the candidates (zero on padding, rows summing to 1)
    used instead of the one-hot gold: loss = lse - sum_j q_j zr_j (a soft-target CE with the same
    scalar-only traffic; treated as a constant). `restricted_kl_divergence` builds it from teacher logits.
    backend: 'auto', 'torch' or 'triton' (kernels/restricted_ce.py).
    fuse_main_grad: when weight has megatron DDP's `main_grad`, add dW into it and give weight no autograd
    gradient (see the module docstring; pass False under DDP's overlap_grad_reduce). Without main_grad
    the gradient is the usual dense autograd one either way.
    validate: check Stage 0's invariants on the candidates (one device sync); False where the caller has
    checked them already (`validate_candidates`).
    """
    _check_shapes(hidden, weight, candidates, targets, target_probs)
    main_grad = getattr(weight, "main_grad", None) if fuse_main_grad and weight.requires_grad else None
    if main_grad is not None and (main_grad.shape != weight.shape or not main_grad.dtype.is_floating_point):
        raise ValueError(f"restricted_cross_entropy: weight.main_grad {main_grad.dtype} {tuple(main_grad.shape)} "
                         f"must be a float tensor of the weight's shape {tuple(weight.shape)}")
    # The loss is per row, so sorting each row's candidates changes nothing but gives the CSR order.
    candidates, order = candidates.long().sort(dim=1)
    if target_probs is not None:
        target_probs = target_probs.gather(1, order)
    targets = targets.long()
    # Without TP this process holds the whole (restricted) vocabulary, so every candidate must be local.
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    v_local = weight.shape[0]
    if validate:
        _check_candidates(candidates, targets, target_probs,
                          *((0, v_local * world) if world > 1 else (vocab_start, vocab_start + v_local)))
    local = candidates - vocab_start
    in_shard = (targets >= 0)[:, None] & (candidates >= 0) & (local >= 0) & (local < v_local)
    rows = torch.where(in_shard, local, -1)
    if target_probs is None:
        q = (candidates == targets[:, None]) & in_shard
    else:
        q = torch.where(in_shard, target_probs, 0.0)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BYTES // max(1, candidates.shape[1] * hidden.shape[1] * 4))
    if chunk_size < 1:
        raise ValueError(f"restricted_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    return _RestrictedCrossEntropy.apply(hidden, weight, rows, q.float(), tp_group,
                                         _select_backend(hidden.device, backend, chunk_size), main_grad)


def renormalized_teacher(teacher_logits: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, log-probs) [N, C] fp32 of stored teacher logits renormalised over each candidate set;
    0 and 0 at padding (and on rows with no candidate)."""
    pad = candidates < 0
    log_q = torch.log_softmax(teacher_logits.float().masked_fill(pad, float("-inf")), dim=1)
    log_q = torch.where(pad, 0.0, log_q)  # an all-padding row's NaNs are padding too
    return torch.where(pad, 0.0, log_q.exp()), log_q


def restricted_kl_divergence(hidden: torch.Tensor, weight: torch.Tensor, candidates: torch.Tensor,
                             targets: torch.Tensor, teacher_logits: torch.Tensor, **options) -> torch.Tensor:
    """Per-position KL(q_teacher || p_student) [N] on S_t, both renormalised over the candidates.

    The optional KL term of SPEC.md section 2: KL = soft-target CE(q) - H(q), so it reuses the op and
    its two scalar all-reduces. teacher_logits [N, C] are the stored candidate logits (any float dtype,
    anything at padding); rows with target -1 give 0. `options`: the keywords of `restricted_cross_entropy`.
    """
    return _weighted_ce_and_kl(hidden, weight, candidates, targets, teacher_logits, 0.0, 1.0, options)


def restricted_ce_with_kl(hidden: torch.Tensor, weight: torch.Tensor, candidates: torch.Tensor,
                          targets: torch.Tensor, teacher_logits: torch.Tensor, kl_weight: float,
                          **options) -> torch.Tensor:
    """Per-position CE + kl_weight * KL(q_teacher || p_student) [N] on S_t, in one call of the op (one
    MAX and one SUM all-reduce under TP). Arguments as `restricted_kl_divergence`; kl_weight >= 0."""
    if not kl_weight >= 0:
        raise ValueError(f"restricted_ce_with_kl: kl_weight must be >= 0, got {kl_weight}")
    return _weighted_ce_and_kl(hidden, weight, candidates, targets, teacher_logits, 1.0, kl_weight, options)


def _weighted_ce_and_kl(hidden, weight, candidates, targets, teacher_logits, ce_weight: float, kl_weight: float,
                        options: dict) -> torch.Tensor:
    """a * CE + b * KL = (a + b) * softCE(target (a * onehot + b * q) / (a + b)) - b * H(q), q the teacher."""
    q, log_q = renormalized_teacher(teacher_logits, candidates)
    total = ce_weight + kl_weight
    onehot = ((candidates == targets[:, None]) & (targets >= 0)[:, None]).float()
    soft_ce = restricted_cross_entropy(hidden, weight, candidates, targets,
                                       target_probs=(ce_weight * onehot + kl_weight * q) / total, **options)
    return torch.where(targets >= 0, total * soft_ce + kl_weight * (q * log_q).sum(dim=1), 0.0)
