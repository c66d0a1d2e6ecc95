"""Optimizer step time: MoClip and the baselines vs torch.optim.AdamW(foreach=True) on transformer-shaped fp32
parameters.

All optimizers run in the same process on the same gradients, in interleaved repetitions; the script
prints the median step time of each and its ratio to AdamW (issue 5 target: MoClip <= 1.5x AdamW), for
two scenarios, in this order: "aligned" keeps the gradient fixed, so the angle stays within the cap
(MoClip never clips); "clipping" draws a fresh random gradient every step, nearly orthogonal to the
momentum, so MoClip clips on every step (its most expensive path). On a shared machine the median
carries other jobs' noise; the minimum is the best estimate of an undisturbed step. The row marked `*` is
MoClip's default path on the device (per-tensor on CPU, in cache-sized blocks; on accelerators the Triton
kernels, row "MoClip(fused)", shown only there); AdamW(fused), torch's single-kernel AdamW, is printed for
context, as is AdamW(per-tensor), torch's default on CPU. The paper's baselines of SPEC.md section 4 that
run in megatron's optimizer stack follow (one process, whole tensors: MoFO with its per-tensor top-20%
radix select, TAM and its cosine variant; AdaMuon and Muon as megatron's Muon stack steps them, MegatronMuon
on the 2-D layer weights and AdamW(foreach) on the embedding and 1-D tensors, Newton-Schulz at
`--muon-precision`; MuonClip is the Muon row plus one norm and scale of the attention gradients, not
timed here); the ratio is each baseline's step time over AdamW's.

    python tools/bench_optimizer.py --params 100e6 --reps 7
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from replay_megatron.optim import TAM, MoClip, MoFO
from replay_megatron.optim.elementwise import CPU_BLOCK_NUMEL, fused_kernels


def transformer_shapes(params: float, hidden: int, ffn: int, vocab: int) -> list[tuple[int, ...]]:
    """Qwen3-like tensor shapes (embedding, per layer q/k/v/o, gate/up/down, norms) adding up to ~`params`."""
    head = 64
    layer = [(hidden, hidden), (hidden // 2, hidden), (hidden // 2, hidden), (hidden, hidden),
             (ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,), (head,), (head,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    layers = max(1, round((params - vocab * hidden) / per_layer))
    return [(vocab, hidden)] + layer * layers + [(hidden,)]


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps MegatronMuon (Muon, or AdaMuon with `adaptive`) on the 2-D weights after the first tensor (the
    embedding) and AdamW(foreach) on the rest, as megatron's Muon stack splits a model."""

    def __init__(self, params: list[torch.Tensor], adaptive: bool, precision: str) -> None:
        from replay_megatron.optim.muon import MegatronMuon

        matrices = [p for i, p in enumerate(params) if i > 0 and p.dim() == 2]
        rest = [p for i, p in enumerate(params) if i == 0 or p.dim() != 2]
        self.parts = [MegatronMuon(matrices, lr=1e-3, weight_decay=0.01, fp32_matmul_prec=precision,
                                   adaptive=adaptive),
                      torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.01, foreach=True)]
        super().__init__(params, {})

    def step(self, closure: None = None) -> None:
        for part in self.parts:
            part.step()


def step_timer(opt: torch.optim.Optimizer, device: torch.device) -> Callable[[], tuple[float, float]]:
    """A function timing one `opt.step()`: (wall seconds, process CPU seconds)."""
    sync = (lambda: None) if device.type == "cpu" else getattr(torch, device.type).synchronize  # cuda, npu

    def run() -> tuple[float, float]:
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        opt.step()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu
    return run


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Run the benchmark; returns scenario -> optimizer -> {median, min, cpu} seconds (also printed)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=100e6, help="total parameter count (default 100M)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per optimizer (interleaved)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--muon-precision", default=None, choices=["highest", "high", "medium"],
                    help="fp32 matmul precision in Newton-Schulz (default: medium, i.e. bf16, on accelerators as "
                         "megatron; highest on CPU)")
    ap.add_argument("--optimizers", default=None, help="comma-separated rows to run (default: all; each row "
                                                       "holds its own parameters and state)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    shapes = transformer_shapes(args.params, args.hidden, args.ffn, args.vocab)
    grads = [torch.randn(s, device=device) for s in shapes]
    numel = sum(g.numel() for g in grads)
    print(f"{numel / 1e6:.1f}M fp32 parameters in {len(shapes)} tensors on {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    def make(build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g  # shared: every optimizer sees the same gradient
        return build(params)

    muon_precision = args.muon_precision or ("highest" if device.type == "cpu" else "medium")
    fused = device.type != "cpu" and fused_kernels() is not None
    default = "per-tensor" if device.type == "cpu" else "fused" if fused else "foreach"
    print(f"MoClip's default path here: {default}"
          + (f" (blocks of {CPU_BLOCK_NUMEL} elements)" if device.type == "cpu" else ""))
    builders = {
        "AdamW(foreach)": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=True),
        "AdamW(per-tensor)": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=False),
        "AdamW(fused)": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True),
        "MoClip(foreach)": lambda p: MoClip(p, lr=1e-3, weight_decay=0.01, foreach=True, fused=False),
        "MoClip(per-tensor)": lambda p: MoClip(p, lr=1e-3, weight_decay=0.01, foreach=False, fused=False),
        "Adam-atan2 (MoClip 180)": lambda p: MoClip(p, lr=1e-3, weight_decay=0.01, max_angle=180.0),
        "MoFO (top 20%)": lambda p: MoFO(p, lr=1e-3, weight_decay=0.01, fraction=0.2),
        "TAM": lambda p: TAM(p, lr=1e-3, weight_decay=0.01),
        "TAM(cosine)": lambda p: TAM(p, lr=1e-3, weight_decay=0.01, cos_update=True),
        "AdaMuon": lambda p: MuonWithAdamW(p, adaptive=True, precision=muon_precision),
        "Muon (MuonClip)": lambda p: MuonWithAdamW(p, adaptive=False, precision=muon_precision),
    }
    if fused:
        builders["MoClip(fused)"] = lambda p: MoClip(p, lr=1e-3, weight_decay=0.01, fused=True)
    wanted = args.optimizers.split(",") if args.optimizers else list(builders)
    unknown = sorted(set(wanted) - set(builders) - {"AdamW(foreach)"})
    if unknown:
        raise SystemExit(f"--optimizers: unknown {unknown}; choose from {list(builders)}")
    # AdamW(foreach) is every ratio's base; the MoClip rows count clipped steps
    optimizers = {name: make(builders[name]) for name in ["AdamW(foreach)"] + wanted if name in builders}
    timers = {name: step_timer(opt, device) for name, opt in optimizers.items()}
    moclip = next((opt for name, opt in optimizers.items() if name.startswith("MoClip")), None)
    names = list(optimizers)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, fresh in (("aligned", False), ("clipping", True)):
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        clipped_before = int(moclip.last_stats.clipped_steps) if moclip and moclip.last_stats else 0
        for rep in range(args.reps + 2):  # two warm-up rounds: state allocation, settling into the scenario
            if fresh:
                for g in grads:
                    g.normal_()
            for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate who goes first
                elapsed = timers[name]()
                if rep >= 2:
                    times[name].append(elapsed)
        clipped = int(moclip.last_stats.clipped_steps) - clipped_before if moclip else 0
        print(f"-- {scenario}: MoClip clipped {clipped} of {args.reps + 2} steps; step time in ms, "
              f"ratio to AdamW(foreach) in brackets")
        base = {k: summary(times["AdamW(foreach)"])[k] for k in ("median", "min", "cpu")}
        results[scenario] = {name: summary(times[name]) for name in names}
        for name, row in results[scenario].items():
            mark = "*" if name == f"MoClip({default})" else " "
            print(f" {mark}{name:26s} " + "  ".join(f"{k} {row[k] * 1e3:8.1f} ({row[k] / base[k]:4.2f})" for k in row))
    return results


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    """Median and minimum wall time, and median process CPU time (less disturbed by other jobs)."""
    walls = [w for w, _ in samples]
    return {"median": statistics.median(walls), "min": min(walls),
            "cpu": statistics.median(c for _, c in samples)}


if __name__ == "__main__":
    main()
