"""One line of `metrics.jsonl` per optimizer step (`run_dir.METRIC_KEYS`, MoClip's statistics, MuonClip's
attention gradient norm, replay's K_t)."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from replay_megatron.training.checkpointing import TrainState
from replay_megatron.training.optimizer import moclip_of


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocator peak on CUDA/NPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "npu":
        return int(torch.npu.max_memory_allocated(device))  # type: ignore[attr-defined]
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def step_record(cfg, state: TrainState, result: dict, optimizer, elapsed: float, device) -> dict[str, Any]:
    """The record of the step `state` has just counted, from `train_step`'s result and its wall time."""
    slots = cfg.train.global_batch_size * cfg.data.seq_length
    record = {"step": state.step, "loss": result["loss"], "lr": float(optimizer.param_groups[0]["lr"]),
              "grad_norm": result["grad_norm"], "skipped": result["skipped"], "tokens": result["tokens"],
              "tokens_per_s": result["real_tokens"] / elapsed, "padding_fraction": 1 - result["real_tokens"] / slots,
              "step_time_s": elapsed,
              "peak_memory_bytes": peak_memory_bytes(device), "consumed_samples": state.consumed_samples}
    moclip = moclip_of(optimizer)
    if moclip is not None and moclip.last_stats is not None and not result["skipped"]:
        s = moclip.last_stats.as_floats()
        record.update(cos_phi=s["cos_phi"], clipped=bool(s["clipped"]), clip_rate=s["clip_rate"],
                      grad_norm_clipped=s["clipped_grad_norm"])
    attention_clip = getattr(optimizer, "attention_clip", None)  # MuonClip: the norm before its clip
    if attention_clip is not None and not result["skipped"]:
        record["attention_grad_norm"] = attention_clip.last_norm
    return record


def k_stats(micro_batches: list, k_max: int, layout) -> dict[str, float]:
    """|S_t| statistics over the step's stored positions (all DP ranks), from a histogram all-reduce."""
    hist = torch.zeros(k_max + 2, dtype=torch.int64, device=layout.device.torch_device)
    if layout.is_last_stage:
        for mb in micro_batches:
            counts = (mb.targets.candidates >= 0).sum(dim=1)
            hist += torch.bincount(counts, minlength=k_max + 2)[:k_max + 2]
    dist.all_reduce(hist)  # over all ranks: each DP group's last stage contributes once per TP rank
    hist = (hist // layout.tp).cpu().double()
    n = hist.sum().item()
    if n == 0:
        return {}
    k = torch.arange(k_max + 2, dtype=torch.float64)
    cdf = hist.cumsum(0)
    return {"k_mean": float((hist * k).sum() / n), "k_median": float(k[int((cdf >= n / 2).nonzero()[0])]),
            "k_max": float(k[hist > 0].max())}
