"""Whole-step benchmark: the paper's Stage 1 step (replay: restricted CE + MoClip) against an AdamW SFT step
(full-vocabulary CE), same model shape, same batch, same run. Also replay + AdamW, which isolates the loss.

Each variant runs in a fresh process (same seed): megatron-core's schedule, DDP and optimizer wrappers;
reported: median and fastest step time after one warm-up step, tokens/s (real tokens of the batch over
the median step) and peak memory (accelerator allocator peak; peak RSS on CPU).

    python tools/bench_stage1_step.py                       # CPU: Qwen3 vocabulary on a small body
    python tools/bench_stage1_step.py --device cuda --preset qwen3-0.6b --seq 4096 --batch 1 \
        --params-dtype bf16                                  # the paper's headline shape (0.51 s vs 0.81 s)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

VARIANTS = (("AdamW SFT (full vocabulary)", "full", "adamw"),
            ("replay + AdamW (restricted CE)", "replay", "adamw"),
            ("replay + MoClip (the paper)", "replay", "moclip"))


def _model_config(args: argparse.Namespace) -> dict:
    from replay_megatron.models.presets import preset

    if args.preset:
        overrides = {"num_hidden_layers": args.layers} if args.layers else {}
        return preset(args.preset, max_position_embeddings=max(40960, args.seq), **overrides)
    return preset("qwen3-4b", hidden_size=args.hidden, num_hidden_layers=args.layers or 2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=3 * args.hidden)


def _replay_batch(batch, vocab: int, candidates: int, device: torch.device):
    """The replay micro-batch of a host batch: every other position stored, |S| distinct candidates with
    the gold first (joined on the host, then moved, as `train` does)."""
    from replay_megatron.training.objectives import ReplayMicroBatch
    from replay_megatron.training.replay_head import replay_targets

    g = torch.Generator().manual_seed(1)

    class Record:
        def __init__(self, row: int) -> None:
            self.positions = torch.arange(0, batch.tokens.shape[1], 2)
            self.targets = batch.labels[row, self.positions]
            rows = []
            for gold in self.targets.tolist():
                others = torch.randint(0, vocab, (candidates + 8,), generator=g).unique()
                others = others[others != gold][: candidates - 1]
                rows.append(torch.cat([torch.tensor([gold]), others]))
            self.candidates = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)

    targets = replay_targets(batch.segments, batch.labels, Record, vocab_size=vocab).to(device)
    return ReplayMicroBatch(batch.to(device), targets)


def run(args: argparse.Namespace, variant: tuple[str, str, str]) -> dict:
    """One variant's figures, measured in this (fresh) process."""
    from replay_megatron.data.dataset import make_batch
    from replay_megatron.optim.megatron import build_optimizer
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.training.objectives import FullVocabCE, RestrictedCE
    from replay_megatron.training.step_metrics import peak_memory_bytes
    from replay_megatron.training.setup import build_ddp_model
    from replay_megatron.training.step import train_step

    hf = _model_config(args)
    layout = initialize(device=args.device, tp=1, pp=1, num_layers=hf["num_hidden_layers"])
    device = layout.device.torch_device
    vocab = hf["vocab_size"]
    g = torch.Generator().manual_seed(0)
    samples = [{"sample_id": i, "tokens": torch.randint(0, vocab, (args.seq + 1,), generator=g).numpy(),
                "loss_mask": torch.ones(args.seq + 1, dtype=torch.uint8).numpy()} for i in range(args.batch)]
    host = make_batch(samples, args.seq, pad_id=0)
    accel = getattr(torch, device.type) if device.type != "cpu" else None
    name, loss, optimizer_name = variant
    torch.manual_seed(0)
    model = build_ddp_model(hf, layout, params_dtype=args.params_dtype)
    optimizer = build_optimizer(optimizer_name, [model], lr=1e-5, params_dtype=args.params_dtype)
    objective, micro_batch = ((FullVocabCE(), host.to(device)) if loss == "full" else
                              (RestrictedCE(), _replay_batch(host, vocab, args.candidates, device)))
    times = []
    for step in range(args.repeats + 1):  # the first is the warm-up
        if accel is not None:
            accel.synchronize()
        start = time.perf_counter()
        train_step(model, optimizer, [micro_batch], objective)
        if accel is not None:
            accel.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak = peak_memory_bytes(device) / 2**20
    shutdown()
    return {"variant": name, "median_s": median, "min_s": min(times), "tokens_per_s": args.batch * args.seq / median,
            "peak_mib": peak}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="a named Qwen3 shape (e.g. qwen3-0.6b); default: the "
                                                       "Qwen3 vocabulary on a --hidden x --layers body")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=None, help="layer count (default: the preset's, else 2)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=101)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--params-dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from replay_megatron.platform.spawn import run_local

    env = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    results = [run_local(run, 1, args, variant, env=env)[0] for variant in VARIANTS]  # a process each
    shape = args.preset or f"H={args.hidden}"
    print(f"Stage 1 step on {args.device}: {shape}, V=151936, {args.batch} x {args.seq} tokens per step, "
          f"|S|={args.candidates}, {args.params_dtype}")
    base = results[0]["median_s"]
    print(f"{'variant':34s} {'median s':>9s} {'min s':>9s} {'tokens/s':>10s} {'peak MiB':>10s} {'speed-up':>9s}")
    for r in results:
        print(f"{r['variant']:34s} {r['median_s']:9.4f} {r['min_s']:9.4f} {r['tokens_per_s']:10.0f} "
              f"{r['peak_mib']:10.0f} {base / r['median_s']:8.2f}x")
    return results


if __name__ == "__main__":
    main()
