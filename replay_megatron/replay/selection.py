"""Stage 0 dynamic Top-K over vocab-parallel logits (SPEC.md section 1, steps 1-5).

Each TP rank holds the logits of its vocabulary rows. The softmax normaliser is made global with a MAX and a
SUM all-reduce of per-position scalars (as Megatron's vocab-parallel cross entropy does); each rank then
offers only its local top-`k_max` (value, global id) pairs, and the global top-`k_max` is merged from those
`TP*k_max` candidates. No rank ever sees more than its own vocabulary shard.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist

# Rows per chunk are chosen so that fp32 temporaries stay near this many elements (64 MiB).
_CHUNK_ELEMENTS = 1 << 24


class TopKSelection(NamedTuple):
    """Result of `dynamic_topk` for N positions (SPEC.md section 1, steps 3-4 and 6)."""

    candidates: torch.Tensor  # [N, k_max+1] int64 global ids: K_t top tokens, gold if appended, -1 padding
    k: torch.Tensor  # [N] int64, K_t
    covered_mass: torch.Tensor  # [N] fp32, sum of the K_t top probabilities
    candidate_logits: torch.Tensor | None = None  # [N, k_max+1] fp32 logits of `candidates`, -inf padding
    lse: torch.Tensor | None = None  # [N] fp32 full-vocabulary log-sum-exp


def _row_chunks(n_rows: int, width: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _order_by_value_then_id(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value descending, equal values by id ascending (SPEC.md section 1, step 2)."""
    ids, perm = torch.sort(ids, dim=-1, stable=True)
    values = values.gather(-1, perm)
    values, perm = torch.sort(values, dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, perm)


def _deterministic_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` of each row of `z` as (fp32 values, local ids) in (value desc, id asc) order.

    `torch.topk` may pick any of several entries tied with the k-th value. Taking k+1 shows which rows have
    such a tie (the (k+1)-th value equals the k-th); only those rows are fixed up: their entries equal to
    the k-th value are replaced by the lowest-id entries of the row holding that value.
    """
    if k == z.shape[1]:
        ids = torch.arange(k, device=z.device).expand(z.shape[0], k)
        return _order_by_value_then_id(z.float(), ids)
    values, ids = torch.topk(z, k + 1, dim=-1)
    redo = (values[:, k] == values[:, k - 1]).nonzero().squeeze(-1)
    values, ids = values[:, :k], ids[:, :k]
    if redo.numel():
        thresh = values[redo, k - 1:]
        ties_kept = (values[redo] == thresh).sum(-1)
        rows, cols = (z.index_select(0, redo) == thresh).nonzero(as_tuple=True)  # ids ascending per row
        per_row = torch.bincount(rows, minlength=redo.numel())
        rank_in_row = torch.arange(rows.numel(), device=z.device) - (per_row.cumsum(0) - per_row)[rows]
        tail = torch.arange(k, device=z.device)[None, :] >= (k - ties_kept)[:, None]
        fixed = ids[redo]
        fixed[tail] = cols[rank_in_row < ties_kept[rows]]
        ids[redo] = fixed
    return _order_by_value_then_id(values.float(), ids)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def _exchange_candidates(values: torch.Tensor, ids: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather every rank's [N, k] (value, global id) pairs into [N, TP*k] (SPEC.md section 1, step 5).

    Ids travel bit-cast as float32 beside the values, so one collective of 2*N*k elements per rank suffices.
    """
    if group is None:
        return values, ids
    tp = dist.get_world_size(group)
    packed = torch.stack([values, ids.to(torch.int32).view(torch.float32)], dim=-1)  # [N, k, 2]
    n = values.shape[0]
    gathered = torch.empty((tp * n, *packed.shape[1:]), dtype=packed.dtype, device=packed.device)
    # torch >= 2.13 names it all_gather_single; older torch (and torch_npu builds) all_gather_into_tensor.
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(gathered, packed, group=group)
    gathered = gathered.view(tp, n, *packed.shape[1:]).permute(1, 0, 2, 3)  # [N, TP, k, 2]
    all_values = gathered[..., 0].reshape(n, -1)
    all_ids = gathered[..., 1].contiguous().view(torch.int32).reshape(n, -1).long()
    return all_values, all_ids


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group) -> int:
    """Validate shapes and target ids; returns the global vocabulary size V = V_local * TP."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V_local], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be [N] = [{logits.shape[0]}], got shape {tuple(targets.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    tp = dist.get_world_size(group) if group is not None else 1
    vocab = logits.shape[1] * tp
    if not 0 <= vocab_start < vocab:
        raise ValueError(f"vocab_start={vocab_start} outside the global vocabulary [0, {vocab})")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must be global token ids in [0, {vocab}); got [{int(targets.min())}, "
                         f"{int(targets.max())}] (drop ignore-index positions before selection)")
    return vocab


class _SoftmaxStats(NamedTuple):
    row_max: torch.Tensor  # [N] fp32 global max logit
    sum_exp: torch.Tensor  # [N] fp32 global sum(exp(z - row_max))
    gold_logit: torch.Tensor  # [N] fp32

    @property
    def lse(self) -> torch.Tensor:
        return self.row_max + torch.log(self.sum_exp)


def _softmax_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group) -> _SoftmaxStats:
    """Global fp32 softmax normaliser and gold logit per row via MAX and SUM all-reduces (SPEC.md 1, step 1).

    The gold logit is non-zero on the one rank whose shard holds the gold id, so a SUM makes it global.
    """
    n, v_local = logits.shape
    row_max = _all_reduce(logits.amax(dim=-1).float(), dist.ReduceOp.MAX, group)
    sums = torch.zeros(n, 2, dtype=torch.float32, device=logits.device)  # [sum exp(z - max), gold logit]
    for rows in _row_chunks(n, v_local):
        sums[rows, 0] = (logits[rows] - row_max[rows, None]).exp_().sum(-1)  # fp32 by type promotion
    local = targets - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    gold = logits.gather(1, local.clamp(0, v_local - 1)[:, None]).squeeze(1).float()
    sums[:, 1] = torch.where(in_shard, gold, torch.zeros_like(gold))
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    stats = _SoftmaxStats(row_max, sums[:, 0], sums[:, 1])
    bad = (~torch.isfinite(stats.lse)).nonzero().squeeze(-1)
    if bad.numel():
        raise ValueError(f"logits rows {bad[:8].tolist()} contain NaN/+inf or are entirely -inf")
    return stats


@torch.no_grad()
def gold_probability(logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int = 0,
                     tp_group=None) -> torch.Tensor:
    """Confidence c_t = p_t(x_t) per row in fp32 (input of the `bucket` position strategy), vocab-parallel."""
    _check_inputs(logits, targets, vocab_start, tp_group)
    stats = _softmax_stats(logits, targets, vocab_start, tp_group)
    return torch.exp(stats.gold_logit - stats.row_max) / stats.sum_exp


@torch.no_grad()
def dynamic_topk(logits: torch.Tensor, targets: torch.Tensor, tau: float, k_max: int, *, vocab_start: int = 0,
                 tp_group=None, return_logits: bool = False) -> TopKSelection:
    """Dynamic Top-K candidate sets S_t for N positions (SPEC.md section 1).

    `logits` [N, V_local] is this rank's vocabulary shard starting at global id `vocab_start` (the whole
    vocabulary when `tp_group` is None); every rank of `tp_group` holds the same N rows and an equal-width
    shard. `targets` [N] are global gold ids. Tokens are ordered by logit descending (the same order as by
    probability), ties by id ascending; K_t = min(min{k : cumsum_k >= tau}, k_max). Padded vocabulary rows
    should be set to -inf by the caller so they are never chosen. With `return_logits`, also returns the
    candidates' fp32 logits and the full log-sum-exp, from which log p_t on S_t is rebuilt exactly.
    Collective traffic: two all-reduces of N scalars (MAX; SUM of [N, 2]) and one all-gather of N*k_max
    (value, id) pairs per rank.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    _check_inputs(logits, targets, vocab_start, tp_group)
    n, v_local = logits.shape
    targets = targets.long()
    stats = _softmax_stats(logits, targets, vocab_start, tp_group)

    k_local = min(k_max, v_local)
    top_values = torch.empty(n, k_local, dtype=torch.float32, device=logits.device)
    top_ids = torch.empty(n, k_local, dtype=torch.int64, device=logits.device)
    for rows in _row_chunks(n, v_local):
        top_values[rows], top_ids[rows] = _deterministic_topk(logits[rows], k_local)
    values, ids = _exchange_candidates(top_values, top_ids + vocab_start, tp_group)
    values, ids = _order_by_value_then_id(values, ids)
    k_eff = min(k_max, values.shape[1])
    values, ids = values[:, :k_eff], ids[:, :k_eff]

    # SPEC.md section 1, step 3: K*_t = min{k : cumsum >= tau}, K_t = min(K*_t, k_max). exp(z - max) / sum
    # rather than exp(z - lse): rounding max + log(sum) to fp32 would cost ~1e-6 of relative accuracy.
    cumulative = (torch.exp(values - stats.row_max[:, None]) / stats.sum_exp[:, None]).cumsum(-1)
    k = ((cumulative < tau).sum(-1) + 1).clamp_(max=k_eff)
    covered_mass = cumulative.gather(1, (k - 1)[:, None]).squeeze(1)

    # Step 4: S_t = top K_t tokens, gold appended last when it is not among them.
    in_set = torch.arange(k_eff, device=logits.device)[None, :] < k[:, None]
    appended = ~((ids == targets[:, None]) & in_set).any(-1)
    candidates = torch.full((n, k_max + 1), -1, dtype=torch.int64, device=logits.device)
    candidates[:, :k_eff] = torch.where(in_set, ids, -1)
    candidates.scatter_(1, k[:, None], torch.where(appended, targets, -1)[:, None])
    if not return_logits:
        return TopKSelection(candidates, k, covered_mass)
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    candidate_logits = torch.full((n, k_max + 1), float("-inf"), dtype=torch.float32, device=logits.device)
    candidate_logits[:, :k_eff] = torch.where(in_set, values, neg_inf)
    candidate_logits.scatter_(1, k[:, None], torch.where(appended, stats.gold_logit, neg_inf)[:, None])
    return TopKSelection(candidates, k, covered_mass, candidate_logits, stats.lse)
