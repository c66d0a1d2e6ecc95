"""Triton kernels of the restricted cross entropy (SPEC.md section 2); reference: replay_megatron.ops.

One position t at a time, each program looping over its share of positions (a capped grid, grid.py).
Forward: gather-dot of h_t with its candidate rows of the local W shard and an online log-sum-exp over
candidate blocks, giving zr [N, C] and the local (max, sum-exp, target logit).
Backward: dh_t = sum_j dzr_j W_j and dW_j += dzr_j h_t, atomically, into the shard's rows (those of
megatron's fp32 main_grad buffer when the weight has one, see replay_megatron.ops). The TP all-reduces of
the per-position scalars run in torch between the two launches (the op's shared code).
Runs on CUDA, on Ascend NPUs through triton-ascend, and on CPU under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from replay_megatron_kernels.grid import capped_grid


@triton.jit
def _restricted_ce_fwd_kernel(h_ptr, w_ptr, rows_ptr, q_ptr, zr_ptr, m_ptr, s_ptr, gold_ptr, N, C, H,
                              stride_h, stride_w, stride_rows, stride_q, stride_zr,
                              BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    for t in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        gold = tl.zeros([], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            in_c = offs_c < C
            rows = tl.load(rows_ptr + t * stride_rows + offs_c, mask=in_c, other=-1).to(tl.int64)
            live = rows >= 0
            acc = tl.zeros([BLOCK_C], tl.float32)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                in_h = offs_h < H
                h = tl.load(h_ptr + t * stride_h + offs_h, mask=in_h, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + rows[:, None] * stride_w + offs_h[None, :],
                            mask=live[:, None] & in_h[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w * h[None, :], axis=1)
            zr = tl.where(live, acc, float("-inf"))
            tl.store(zr_ptr + t * stride_zr + offs_c, zr, mask=in_c)
            q = tl.load(q_ptr + t * stride_q + offs_c, mask=in_c, other=0.0)
            gold += tl.sum(q * acc)  # acc is 0 and q is 0 where not live
            m_new = tl.maximum(m, tl.max(zr, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no live candidate yet: keep s = 0, no NaN
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(zr - shift))
            m = m_new
        tl.store(m_ptr + t, m)
        tl.store(s_ptr + t, s)
        tl.store(gold_ptr + t, gold)


@triton.jit
def _restricted_ce_bwd_kernel(dzr_ptr, h_ptr, w_ptr, rows_ptr, dh_ptr, dw_ptr, N, C, H,
                              stride_dzr, stride_h, stride_w, stride_rows, stride_dh, stride_dw,
                              COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    for t in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            in_h = offs_h < H
            h = tl.load(h_ptr + t * stride_h + offs_h, mask=in_h, other=0.0).to(tl.float32)
            dh = tl.zeros([BLOCK_H], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                in_c = offs_c < C
                rows = tl.load(rows_ptr + t * stride_rows + offs_c, mask=in_c, other=-1).to(tl.int64)
                dz = tl.load(dzr_ptr + t * stride_dzr + offs_c, mask=in_c, other=0.0)
                live = (rows >= 0) & (dz != 0.0)
                tile = live[:, None] & in_h[None, :]
                if COMPUTE_DH:
                    w = tl.load(w_ptr + rows[:, None] * stride_w + offs_h[None, :], mask=tile, other=0.0)
                    dh += tl.sum(dz[:, None] * w.to(tl.float32), axis=0)
                if COMPUTE_DW:
                    tl.atomic_add(dw_ptr + rows[:, None] * stride_dw + offs_h[None, :],
                                  dz[:, None] * h[None, :], mask=tile)
            if COMPUTE_DH:
                tl.store(dh_ptr + t * stride_dh + offs_h, dh, mask=in_h)


def _blocks(c: int, h: int) -> tuple[int, int]:
    return min(64, triton.next_power_of_2(max(c, 1))), min(128, triton.next_power_of_2(max(h, 1)))


class TritonCandidates:
    """The op's CandidateBackend on the kernels above (same contract as ops.TorchCandidates)."""

    def logits_and_stats(self, hidden, weight, rows, q):
        n, c = rows.shape
        hidden, weight, rows, q = hidden.contiguous(), weight.contiguous(), rows.contiguous(), q.contiguous()
        zr = torch.empty((n, c), dtype=torch.float32, device=hidden.device)
        m, s, gold = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
        if n:
            block_c, block_h = _blocks(c, hidden.shape[1])
            _restricted_ce_fwd_kernel[capped_grid(n)](
                hidden, weight, rows, q, zr, m, s, gold, n, c, hidden.shape[1], hidden.stride(0),
                weight.stride(0), rows.stride(0), q.stride(0), zr.stride(0), BLOCK_C=block_c, BLOCK_H=block_h)
        return zr, m, s, gold

    def grads(self, dzr, hidden, weight, rows, need_dh, dw_out):
        n, c = rows.shape
        dzr, hidden, weight, rows = dzr.contiguous(), hidden.contiguous(), weight.contiguous(), rows.contiguous()
        dh = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
        # the kernel adds fp32 rows atomically into its target: dw_out itself when it can take them (the
        # op's dense buffer, or an fp32 megatron main_grad), else an fp32 scratch added afterwards
        direct = dw_out is None or (dw_out.dtype == torch.float32 and dw_out.stride(1) == 1)
        dw = dw_out if direct else torch.zeros(dw_out.shape, dtype=torch.float32, device=dw_out.device)
        if n and (need_dh or dw is not None):
            block_c, block_h = _blocks(c, hidden.shape[1])
            dh_arg, dw_arg = (dzr if dh is None else dh), (dzr if dw is None else dw)  # unused pointers when off
            _restricted_ce_bwd_kernel[capped_grid(n)](
                dzr, hidden, weight, rows, dh_arg, dw_arg, n, c, hidden.shape[1], dzr.stride(0), hidden.stride(0),
                weight.stride(0), rows.stride(0), dh_arg.stride(0), dw_arg.stride(0), COMPUTE_DH=need_dh,
                COMPUTE_DW=dw is not None, BLOCK_C=block_c, BLOCK_H=block_h)
        if not direct:
            dw_out += dw.to(dw_out.dtype)
        return dh
