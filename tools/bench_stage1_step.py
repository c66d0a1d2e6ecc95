"""Whole-step benchmark: one Stage 1 replay training step vs one full-vocabulary SFT step, same model,
same batch, same run (issue 4 item 4). A Qwen3-shaped model small enough for a CPU, with the real
vocabulary (151936), megatron-core schedule + DDP + AdamW, one process.

    python tools/bench_stage1_step.py [--hidden 256] [--layers 2] [--seq 128] [--batch 2] [--candidates 101]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def run(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    from replay_megatron.data.dataset import make_batch
    from replay_megatron.models.presets import preset
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.training.objectives import FullVocabCE, ReplayMicroBatch, RestrictedCE
    from replay_megatron.training.replay_head import replay_targets
    from replay_megatron.optim.megatron import build_optimizer
    from replay_megatron.training.setup import build_ddp_model
    from replay_megatron.training.step import train_step

    hf = preset("qwen3-4b", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, intermediate_size=3 * args.hidden)
    layout = initialize(device=args.device, tp=1, pp=1, num_layers=args.layers)
    model = build_ddp_model(hf, layout)
    optimizer = build_optimizer("adamw", [model], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    V = hf["vocab_size"]
    samples = [{"sample_id": i, "tokens": torch.randint(0, V, (args.seq + 1,), generator=g).numpy(),
                "loss_mask": torch.ones(args.seq + 1, dtype=torch.uint8).numpy()} for i in range(args.batch)]
    batch = make_batch(samples, args.seq, pad_id=0).to(layout.device.torch_device)

    class Record:  # every other position stored, |S| candidates with the gold among them
        def __init__(self, row):
            self.positions = torch.arange(0, args.seq, 2)
            self.targets = batch.labels[row, self.positions].cpu()
            rows = []
            for gold in self.targets.tolist():  # duplicate-free candidates, gold first
                others = torch.randperm(V, generator=g)[: args.candidates]
                rows.append(torch.cat([torch.tensor([gold]), others[others != gold][: args.candidates - 1]]))
            self.candidates = torch.stack(rows)

    replay = ReplayMicroBatch(batch, replay_targets(batch.sample_ids, batch.labels, lambda sid: Record(sid)))
    variants = [("full-vocabulary SFT step", FullVocabCE(), batch), ("replay step (restricted CE)", RestrictedCE(), replay)]
    results = []
    for name, objective, mb in variants:
        train_step(model, optimizer, [mb], objective)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            train_step(model, optimizer, [mb], objective)
            times.append(time.perf_counter() - start)
        results.append((name, statistics.median(times), min(times)))
    shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=101)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from replay_megatron.platform.spawn import run_local

    [results] = run_local(run, 1, args, env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    base = results[0][1]
    print(f"V=151936 H={args.hidden} layers={args.layers} tokens/step={args.batch * args.seq} |S|={args.candidates}")
    print(f"{'variant':32s} {'median s':>10s} {'min s':>10s} {'speed-up':>9s}")
    for name, median, best in results:
        print(f"{name:32s} {median:10.4f} {best:10.4f} {base / median:8.2f}x")


if __name__ == "__main__":
    main()
