"""Exact top-k selection over tensors split across ranks, without gathering them (MoFO, SPEC.md section 4).

`kth_largest` finds, for every slot (logical tensor) at once, the k-th largest of non-negative integer keys
below 2**32 held in pieces on several ranks: a radix select on the key bits, 8 bits a round, each round one
int64 histogram [slots, 256] reduced by the `TensorLayout` (4 rounds). Values become keys through their
float bits (for |m|, non-negative floats order like their int32 bits). Where a tensor has more entries
equal to its k-th value than places left, the ties are broken by a second select over
`2**32 - 1 - logical index` among them, so the lowest indices win and exactly k entries are chosen; the
host reads once per step which tensors need it (float |m| rarely ties except at zero).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from replay_megatron.optim.tensor_layout import TensorLayout

KEY_BITS, DIGIT_BITS = 32, 8
INDEX_KEY_TOP = (1 << KEY_BITS) - 1


def kth_largest(keys: Sequence[Tensor], slots: Sequence[int], k: Tensor,
                layout: TensorLayout) -> tuple[Tensor, Tensor, Tensor]:
    """(threshold, take, tied) per slot: the k-th largest key of the slot's pieces (integer keys in
    [0, 2**32); negative keys take no part), how many entries equal to it belong to the top k, and how
    many entries equal it.

    `keys[i]` is a 1-D integer piece of slot `slots[i]`; `k` [slots] int64, known on every rank (0: unused slot).
    """
    n = k.numel()
    device = k.device
    prefix = torch.zeros(n, dtype=torch.int64, device=device)
    need = k.clone()
    digits = torch.arange(1 << DIGIT_BITS, device=device)
    for shift in range(KEY_BITS - DIGIT_BITS, -1, -DIGIT_BITS):
        hist = torch.zeros(n, 1 << DIGIT_BITS, dtype=torch.int64, device=device)
        for key, slot in zip(keys, slots):
            match = (key >= 0) & ((key >> (shift + DIGIT_BITS)) == prefix[slot])
            # entries off the prefix count in an extra bin: a fixed-size histogram, no host sync
            digit = torch.where(match, (key >> shift) & ((1 << DIGIT_BITS) - 1), 1 << DIGIT_BITS)
            hist[slot] += torch.bincount(digit, minlength=(1 << DIGIT_BITS) + 1)[:1 << DIGIT_BITS]
        hist = layout.reduce_counts(hist)
        at_least = hist.flip(1).cumsum(1).flip(1)  # entries with this digit or a larger one
        digit = (at_least >= need.unsqueeze(1)).sum(1).sub_(1).clamp_(min=0)  # the largest digit reaching `need`
        above = torch.where(digit < digits[-1], at_least.gather(1, (digit + 1).clamp_(max=digits[-1]).unsqueeze(1))
                            .squeeze(1), 0)
        need -= above
        prefix = prefix * (1 << DIGIT_BITS) + digit
    return prefix, need, hist.gather(1, digit.unsqueeze(1)).squeeze(1)


def top_k_masks(values: Sequence[Tensor], slots: Sequence[int], offsets: Sequence[int], k: Tensor,
                layout: TensorLayout) -> list[Tensor]:
    """Bool masks over the pieces `values` (non-negative floats, flattened) of the k[slot] largest entries
    of each slot's logical tensor; ties at the threshold go to the lowest logical flat indices.

    `offsets[i]`: flat offset of piece i in its TP-local tensor (distributed-optimizer shards).
    """
    keys = [v.reshape(-1).float().view(torch.int32) for v in values]  # non-negative floats: bits below 2**31
    threshold, take, tied = kth_largest(keys, slots, k, layout)
    masks = [key >= threshold[slot] for key, slot in zip(keys, slots)]
    needs_index = (tied > take).tolist()  # the same on every rank: from reduced counts
    if not any(needs_index):
        return masks
    ties = [i for i, slot in enumerate(slots) if needs_index[slot]]
    tie_keys = []
    for i in ties:
        key, slot, offset = keys[i], slots[i], offsets[i]
        local = torch.arange(offset, offset + key.numel(), device=key.device)
        index_key = INDEX_KEY_TOP - layout.slots[slot].logical_index(local)
        tie_keys.append(torch.where(key == threshold[slot], index_key, -1))
    cut, _, _ = kth_largest(tie_keys, [slots[i] for i in ties], take, layout)
    for i, tie in zip(ties, tie_keys):
        masks[i] = (keys[i] > threshold[slots[i]]) | (tie >= cut[slots[i]])
    return masks
