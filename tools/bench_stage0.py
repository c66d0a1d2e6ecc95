"""Benchmark: Stage 0 collection vs a forward-only pass of the same model and batches (issue 3, item 5).

One process (TP1 x PP1, megatron-core Qwen3 with random weights), the same seeded micro-batches for every
row of the table:

  forward   megatron's forward-only pipeline schedule, logits discarded (what any eval pass costs)
  collect   the same schedule with Stage 0's per-micro-batch work (replay.records.select_records: vocab
            padding mask, position strategy, vocab-parallel dynamic Top-K) and the replay-store writer,
            including the final merge of the shard; one row per position strategy

Times are the fastest of --repeats (default 1) runs after one warm-up (wall clock; on CPU also process CPU seconds,
less distorted on a shared machine). Storage is the finished store's bytes per stored position and its
fraction of full fp16 logits (2*V bytes per position). Random weights give flat next-token
distributions; --logit-scale multiplies the final norm so K_t falls below K_max as with a trained model
(1 = flat = worst case, K_t = K_max everywhere).

Defaults (CPU, < 1 min): Qwen3-0.6B's vocabulary (V=151936) and head_dim on a 2-layer, H=256 body,
3 micro-batches of 2 x 256 tokens, tau 0.95, K_max 200, logits not stored.

Usage: python tools/bench_stage0.py [--device cpu|cuda|npu] [--vocab V] [--hidden H] [--layers L]
       [--seq S] [--micro-batch B] [--micro-batches M] [--k-max K] [--tau T] [--store-logits none|fp16|...]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.95)
    p.add_argument("--k-max", type=int, default=200)
    p.add_argument("--store-logits", default="none", choices=("none", "fp16", "bf16", "fp32"))
    p.add_argument("--logit-scale", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--strategies", default="all,bucket")
    return p.parse_args(argv)


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(fastest wall seconds, its process CPU seconds) over `repeats` runs after one warm-up."""
    fn()
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns one dict per row (pass, strategy, wall_s, cpu_s), also printed."""
    args = _args(argv)
    from replay_megatron.data.dataset import make_batch
    from replay_megatron.models.forward import pipeline_forward
    from replay_megatron.models.presets import preset
    from replay_megatron.models.qwen3 import build_stage
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.replay.records import CollectSettings, select_records
    from replay_megatron.replay.store import ReplayStore
    from replay_megatron.replay.store_writer import ReplayStoreWriter, finalize_store

    hf = preset("qwen3-0.6b", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=4 * args.hidden,
                max_position_embeddings=max(4096, args.seq))
    layout = initialize(device=args.device, tp=1, pp=1, seed=0, num_layers=args.layers)
    device = layout.device.torch_device
    model = build_stage(hf, layout).eval()
    with torch.no_grad():
        model.decoder.final_layernorm.weight.mul_(args.logit_scale)
    g = torch.Generator().manual_seed(0)
    samples = [{"sample_id": i, "tokens": torch.randint(0, args.vocab, (args.seq + 1,), generator=g).numpy(),
                "loss_mask": torch.ones(args.seq + 1, dtype=torch.uint8).numpy()}
               for i in range(args.micro_batch * args.micro_batches)]
    batches = [make_batch(samples[m * args.micro_batch:(m + 1) * args.micro_batch], args.seq, 0).to(device)
               for m in range(args.micro_batches)]
    tokens = [b.tokens for b in batches]

    def sync() -> None:
        if device.type != "cpu":
            getattr(torch, device.type).synchronize()

    def forward() -> None:
        pipeline_forward(model, tokens, lambda out, i: None)
        sync()

    rows = [("forward", "-", *_timed(forward, args.repeats), None)]
    for strategy in args.strategies.split(","):
        settings = CollectSettings(tau=args.tau, k_max=args.k_max, strategy=strategy, amount=0.5, buckets=5,
                                   seed=0, store_logits=None if args.store_logits == "none" else args.store_logits,
                                   micro_batch_size=args.micro_batch, seq_length=args.seq)
        with tempfile.TemporaryDirectory() as tmp:
            runs = iter(range(1 << 30))

            def collect() -> None:
                store = Path(tmp) / f"run{next(runs)}"
                writer = ReplayStoreWriter(store, 0, k_max=args.k_max, logits_dtype=settings.store_logits)

                def on_output(logits: torch.Tensor, i: int) -> None:
                    b = batches[i]
                    for r in select_records(logits, b.labels, b.loss_mask, b.segments, settings,
                                            vocab_size=args.vocab):
                        writer.add(r.sample_id, r.positions, r.targets, r.selection)

                pipeline_forward(model, tokens, on_output)
                writer.close()
                finalize_store(store, 1, config={}, fingerprints=dict.fromkeys(("model", "tokenizer", "dataset"), "-"),
                               vocab_size=args.vocab)
                sync()

            wall, cpu = _timed(collect, args.repeats)
            rows.append(("collect", strategy, wall, cpu, ReplayStore.open(Path(tmp) / "run0").summary()))
    shutdown()

    base_wall, base_cpu = rows[0][2], rows[0][3]
    print(f"Stage 0 benchmark on {layout.device.type}: V={args.vocab} H={args.hidden} L={args.layers}, "
          f"{args.micro_batches} micro-batches of {args.micro_batch}x{args.seq} tokens, tau={args.tau}, "
          f"K_max={args.k_max}, logits stored: {args.store_logits}, logit scale {args.logit_scale}")
    print(f"{'pass':8} {'positions':>9} {'strategy':>8} {'wall s':>8} {'cpu s':>8} {'x fwd':>6} {'x fwd cpu':>9} "
          f"{'K mean':>7} {'gold app':>8} {'B/pos':>7} {'vs fp16':>8}")
    for name, strategy, wall, cpu, s in rows:
        tail = (f"{s['k_mean']:7.1f} {100 * s['gold_appended_rate']:7.1f}% {s['bytes_per_position']:7.1f} "
                f"{100 * s['fraction_of_fp16_logits']:7.3f}%" if s else "")
        positions = s["positions"] if s else args.micro_batch * args.micro_batches * args.seq
        print(f"{name:8} {positions:9d} {strategy:>8} {wall:8.3f} {cpu:8.3f} {wall / base_wall:6.2f} "
              f"{cpu / base_cpu:9.2f} {tail}")
    return [{"pass": name, "strategy": strategy, "wall_s": wall, "cpu_s": cpu} for name, strategy, wall, cpu, _ in rows]


if __name__ == "__main__":
    main()
