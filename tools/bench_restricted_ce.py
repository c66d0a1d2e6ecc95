"""Benchmark: restricted cross entropy vs full-vocabulary cross entropy, forward + backward (issue 4).

Default shape: the Qwen3-4B output layer (H=2560, V=151936), N=4096 positions, |S|=101 candidates per
position (distinct random ids, gold among them), fp32. As under megatron-core DDP, the weight carries a
preallocated fp32 `main_grad` [V, H] (DDP's view of its grad buffer) and every variant ends with its weight
gradient accumulated there and `weight.grad` None. Variants, all on the same seeded inputs:

  op               replay_megatron.ops.restricted_cross_entropy on its PyTorch path (backend torch), in
                   its main_grad mode: dW rows are added into main_grad block by block, no dense dW
  kernel           the same op on the Triton kernel, dW added atomically into main_grad (only with --device
                   cuda/npu and triton importable)
  gather           plain PyTorch reference: weight[candidates] -> bmm -> log_softmax -> gold, autograd; its
                   dense weight.grad is then added into main_grad (what DDP's backward hook does)
  full_vocab       hidden @ weight.T, then megatron-core's vocab_parallel_cross_entropy at TP=1 (a 1-process
                   gloo group and parallel_state.initialize_model_parallel(1, 1); works on CPU); dense
                   weight.grad added into main_grad as DDP's hook does (megatron's default output layer)
  full_vocab_fused the same, but the output matmul's backward adds dW straight into main_grad with one addmm_
                   (megatron's gradient_accumulation_fusion, whose fused kernel is CUDA-only, written out in
                   torch here): the full-vocabulary baseline without a dense dW

Each variant runs in its own fresh subprocess, so only one variant's tensors are in memory at a time and
no allocator state leaks between them. In it: one profiled run (also the warm-up), then --repeats timed
runs (the fastest is reported; wall clock, and on CPU also process CPU seconds, which a machine shared
with other jobs distorts less).

Peak memory is counted ABOVE the common baseline: hidden, weight, its fp32 main_grad, candidates and
targets exist before the measured step in every variant and are counted in none (the line "baseline"
prints their size). So the main_grad buffer is in neither figure; a dense dW is, where a variant makes one.
- CPU: torch.profiler with profile_memory=True reports every allocation of torch's CPU allocator with its
  running "Total Allocated", counted from the start of profiling; the peak of that counter is the step's
  peak. (RSS would also count the allocator's caching and the interpreter; tracemalloc sees no torch
  memory.) Memory that libraries allocate behind torch's back (MKL scratch) is not seen.
- CUDA/NPU: max_memory_allocated() - memory_allocated() before the step, after reset_peak_memory_stats().
"transient" is the peak minus what is still allocated when the step ends (hidden.grad [N, H] and the
loss), i.e. the working memory of the loss itself (logits, softmax, gathered rows, dense dW). The op's
peak is mostly hidden.grad (fp32 [N, H], 40 MiB at the default shape), which every variant produces; its
transient is one block of dW rows (8 MiB) and O(N * |S|) ids, softmax and sort buffers.

Usage: python tools/bench_restricted_ce.py [--quick] [--device cpu|cuda|npu] [--n N --h H --v V --k K]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = ("op", "kernel", "gather", "full_vocab", "full_vocab_fused")
FULL = dict(n=4096, h=2560, v=151936, k=101)
QUICK = dict(n=256, h=256, v=8192, k=33)


def _inputs(args, torch):
    """Seeded hidden [N,H], weight [V,H] with a zero fp32 main_grad, candidates [N,K] (distinct ids),
    targets [N] (gold among them)."""
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(args.n, args.h, generator=g) / args.h ** 0.5
    weight = torch.randn(args.v, args.h, generator=g)
    rows = [torch.rand(min(256, args.n - s), args.v, generator=g).topk(args.k).indices for s in range(0, args.n, 256)]
    candidates = torch.cat(rows)
    targets = candidates.gather(1, torch.randint(0, args.k, (args.n, 1), generator=g)).squeeze(1)
    device = torch.device(args.device)
    weight = weight.to(device, dtype).requires_grad_()
    weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=device)
    return hidden.to(device, dtype).requires_grad_(), weight, candidates.to(device), targets.to(device)


def _fused_wgrad_matmul(torch):
    """h @ W.T whose backward adds dW into W.main_grad (megatron's gradient_accumulation_fusion)."""

    class FusedWgradMatmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w):
            ctx.save_for_backward(h, w)
            return h @ w.t()

        @staticmethod
        def backward(ctx, grad):
            h, w = ctx.saved_tensors
            w.main_grad.addmm_(grad.t().float(), h.float())
            return grad @ w, None

    return FusedWgradMatmul.apply


def _step_fn(variant: str, torch):
    """The loss of one variant as f(hidden, weight, candidates, targets) -> per-position loss."""
    from replay_megatron.ops import restricted_cross_entropy

    if variant in ("op", "kernel"):
        backend = "triton" if variant == "kernel" else "torch"
        return lambda h, w, c, t: restricted_cross_entropy(h, w, c, t, backend=backend)
    if variant == "gather":
        def gather(h, w, c, t):
            z = torch.bmm(w[c].float(), h.float().unsqueeze(-1)).squeeze(-1)  # [N, K, H] gathered at once
            return -torch.log_softmax(z, dim=-1).gather(1, (c == t[:, None]).float().argmax(1, keepdim=True)).squeeze(1)
        return gather
    if variant in ("full_vocab", "full_vocab_fused"):
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        from replay_megatron.platform.spawn import free_port

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
        matmul = _fused_wgrad_matmul(torch) if variant == "full_vocab_fused" else lambda h, w: h @ w.t()
        # [s, b, V] layout as in megatron's GPT loss; the matmul is part of what full-vocab SFT pays
        return lambda h, w, c, t: vocab_parallel_cross_entropy(matmul(h, w).float().unsqueeze(1), t.unsqueeze(1))
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


class _Device:
    """Synchronisation and peak-memory counters of the chosen device."""

    def __init__(self, device: str, torch):
        self.torch, self.kind = torch, device
        self.accel = None
        if device == "npu":
            import torch_npu  # noqa: F401 - registers torch.npu
            self.accel = torch.npu
        elif device == "cuda":
            self.accel = torch.cuda

    def sync(self):
        if self.accel is not None:
            self.accel.synchronize()

    def peak_memory(self, run) -> tuple[int, int]:
        """(peak, still allocated at the end) bytes that run() allocates."""
        if self.accel is not None:
            self.sync()
            base = self.accel.memory_allocated()
            self.accel.reset_peak_memory_stats()
            run()
            self.sync()
            return self.accel.max_memory_allocated() - base, self.accel.memory_allocated() - base
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
        return (max(totals), totals[-1]) if totals else (0, 0)


def worker(args) -> dict:
    """Measure one variant in this process; returns the figures as a dict."""
    import torch

    dev = _Device(args.device, torch)
    hidden, weight, candidates, targets = _inputs(args, torch)
    loss_fn = _step_fn(args.worker, torch)
    kept = {}

    def step():
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight, candidates, targets)
        loss.mean().backward()
        if weight.grad is not None:  # DDP's backward hook: main_grad += param.grad; param.grad = None
            weight.main_grad.add_(weight.grad)
            weight.grad = None
        kept["loss"] = float(loss.mean())

    hidden.grad = weight.grad = None
    peak, end = dev.peak_memory(step)
    walls, cpus = [], []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        dev.sync()
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        dev.sync()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    baseline = sum(t.numel() * t.element_size() for t in (hidden, weight, weight.main_grad, candidates, targets))
    return dict(variant=args.worker, wall_s=min(walls), cpu_s=min(cpus), peak_mib=peak / 2**20,
                transient_mib=(peak - end) / 2**20, loss=kept["loss"], baseline_mib=baseline / 2**20)


def _available(variant: str, device: str) -> str | None:
    """Why a variant cannot run here, or None."""
    if variant == "kernel":
        if device == "cpu":
            return "needs --device cuda or npu"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not importable"
    return None


def main(argv=None) -> dict:
    """Run the benchmark; returns variant -> figures (also printed as a table)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "npu"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quick", action="store_true", help=f"small shapes {QUICK} (unless given explicitly)")
    for name in FULL:
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {FULL[name]} ({QUICK[name]} with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 1, 3 with --quick)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 1
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return {}

    shape = f"N={args.n} H={args.h} V={args.v} |S|={args.k} {args.dtype} on {args.device}"
    print(f"restricted CE benchmark: {shape}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
          flush=True)
    results = {}
    for variant in args.variants:
        why = _available(variant, args.device)
        if why:
            print(f"  {variant}: skipped ({why})", flush=True)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--device", args.device,
               "--dtype", args.dtype, "--repeats", str(args.repeats),
               *(x for name in FULL for x in (f"--{name}", str(getattr(args, name))))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"  {variant}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[variant] = json.loads(line[len("RESULT "):])
        r = results[variant]
        print(f"  {variant}: {r['wall_s']:.2f} s wall, peak {r['peak_mib']:.0f} MiB above a baseline of "
              f"{r['baseline_mib']:.0f} MiB, loss {r['loss']:.6f}", flush=True)
    _print_table(results)
    return results


def _print_table(results: dict) -> None:
    head = f"{'variant':<17}{'wall s':>10}{'cpu s':>10}{'peak MiB':>12}{'transient MiB':>15}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in results.items():
        print(f"{name:<17}{r['wall_s']:>10.2f}{r['cpu_s']:>10.2f}{r['peak_mib']:>12.1f}{r['transient_mib']:>15.1f}")
    for base_name in ("full_vocab", "full_vocab_fused"):
        base = results.get(base_name)
        if base is None:
            continue
        head = (f"{'ratios ' + base_name + ' / variant':<40}{'x faster':>10}{'x less cpu s':>14}{'x less peak':>13}"
                f"{'x less transient':>18}")
        print("\n" + head + "\n" + "-" * len(head))
        for name, r in results.items():
            if name != base_name:
                print(f"{name:<40}{base['wall_s'] / r['wall_s']:>10.1f}{base['cpu_s'] / max(r['cpu_s'], 1e-9):>14.1f}"
                      f"{base['peak_mib'] / max(r['peak_mib'], 1e-9):>13.1f}"
                      f"{base['transient_mib'] / max(r['transient_mib'], 1e-9):>18.1f}")
    print("peak and transient are above the common baseline (module docstring); 'x faster' is by the fastest wall "
          "clock, 'x less cpu s' by process CPU seconds")


if __name__ == "__main__":
    main()
