"""Sequence packing benchmark: Stage 0 (forward + record selection) and Stage 1 (a replay training step)
on the same samples, one sample per row (padded) against packed rows (data.packing), in one run.

Samples have uniformly random lengths in [--min-len, --max-len] (SFT-like: 100-1000 tokens at seq 4096
by default); tokens/s counts real tokens only (the same samples either way), so the ratio is the
speed-up packing buys. Stage 1 is one optimizer step over all the samples, on the records Stage 0
selected (keyed by position inside the sample, so both layouts train on the same targets). Both stages
and layouts are warmed up first; each figure is the fastest of --repeats runs.

    python tools/bench_packing.py --device cuda                          # the paper's sequence length
    python tools/bench_packing.py --seq 1024 --min-len 25 --max-len 250  # the same mix, CPU-sized
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _time(fn, device: torch.device) -> float:
    accel = getattr(torch, device.type) if device.type != "cpu" else None
    if accel is not None:
        accel.synchronize()
    start = time.perf_counter()
    fn()
    if accel is not None:
        accel.synchronize()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict]:
    """Figures for both layouts, measured in this process."""
    from replay_megatron.data.dataset import make_batch, make_rows_batch
    from replay_megatron.data.packing import pack_lengths
    from replay_megatron.models.forward import pipeline_forward
    from replay_megatron.models.presets import preset
    from replay_megatron.optim.megatron import build_optimizer
    from replay_megatron.platform.device import host_to_device
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.replay.records import CollectSettings, select_records
    from replay_megatron.training.objectives import ReplayMicroBatch, RestrictedCE
    from replay_megatron.training.replay_head import replay_targets
    from replay_megatron.training.setup import build_ddp_model
    from replay_megatron.training.step import train_step

    hf = preset("qwen3-4b", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, intermediate_size=3 * args.hidden, vocab_size=args.vocab,
                max_position_embeddings=max(40960, args.seq))
    layout = initialize(device=args.device, tp=1, pp=1, num_layers=hf["num_hidden_layers"])
    device = layout.device.torch_device
    rng = np.random.default_rng(0)
    samples = []
    for i in range(args.samples):
        n = int(rng.integers(args.min_len, args.max_len + 1))
        prompt = int(rng.integers(1, n // 2))
        samples.append({"sample_id": i, "tokens": rng.integers(0, args.vocab, n + 1),
                        "loss_mask": np.array([0] * (prompt + 1) + [1] * (n - prompt), dtype=np.uint8)})
    b = args.micro_batch
    unpacked = [make_batch(samples[k:k + b], args.seq, 0) for k in range(0, len(samples), b)]
    packs = pack_lengths(np.array([len(s["tokens"]) - 1 for s in samples]), args.seq)
    packed = [make_rows_batch([[samples[i] for i in p] for p in packs[k:k + b]], args.seq, 0)
              for k in range(0, len(packs), b)]
    real = sum(len(s["tokens"]) - 1 for s in samples)
    torch.manual_seed(0)
    model = build_ddp_model(hf, layout)
    optimizer = build_optimizer("adamw", [model], lr=1e-6)
    settings = CollectSettings(tau=0.9, k_max=args.k_max, strategy="all", amount=1.0, buckets=1, seed=0,
                               store_logits=None, micro_batch_size=b, seq_length=args.seq)
    records: dict[int, object] = {}

    def stage0(batches, packed_rows: bool):
        def on_output(logits, i):
            batch = batches[i]
            for r in select_records(logits, host_to_device(batch.labels, logits.device), batch.loss_mask,
                                    batch.segments, settings, vocab_size=args.vocab):
                records[r.sample_id] = type("Record", (), {"positions": r.positions, "targets": r.targets,
                                                           "candidates": r.selection.candidates})

        positions = [host_to_device(x.position_ids, device) for x in batches] if packed_rows else None
        pipeline_forward(model, [host_to_device(x.tokens, device) for x in batches], on_output, positions)

    def stage1(batches):  # one optimizer step over all the samples, a micro-batch per `b` rows
        micro = [ReplayMicroBatch(x.to(device), replay_targets(x.segments, x.labels, records.__getitem__,
                                                               vocab_size=args.vocab).to(device)) for x in batches]
        train_step(model, optimizer, micro, RestrictedCE())

    layouts = (("one sample per row", unpacked, False), ("packed", packed, True))
    stage0(unpacked, False)  # every sample's records, for Stage 1
    for _, batches, packed_rows in layouts:  # warm-up
        stage0(batches[:1], packed_rows)
        stage1(batches[:1])
    out = []
    for name, batches, packed_rows in layouts:
        rows = sum(x.tokens.shape[0] for x in batches)
        t0 = min(_time(lambda: stage0(batches, packed_rows), device) for _ in range(args.repeats))
        t1 = min(_time(lambda: stage1(batches), device) for _ in range(args.repeats))
        out.append({"layout": name, "rows": rows, "padding": 1 - real / (rows * args.seq),
                    "stage0_tokens_per_s": real / t0, "stage1_tokens_per_s": real / t1})
    shutdown()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=1, help="rows per micro-batch")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--k-max", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per stage and layout (the fastest counts)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from replay_megatron.platform.spawn import run_local

    results = run_local(run, 1, args, env={"OMP_NUM_THREADS": str(torch.get_num_threads())})[0]
    print(f"packing on {args.device}: {args.samples} samples of {args.min_len}-{args.max_len} tokens, seq "
          f"{args.seq}, H={args.hidden} x {args.layers} layers, V={args.vocab}, {args.micro_batch} row(s) per "
          f"micro-batch; tokens/s counts real tokens")
    print(f"{'layout':20s} {'rows':>5s} {'padding':>8s} {'Stage 0 tok/s':>14s} {'Stage 1 tok/s':>14s}")
    for r in results:
        print(f"{r['layout']:20s} {r['rows']:5d} {r['padding']:8.1%} {r['stage0_tokens_per_s']:14.0f} "
              f"{r['stage1_tokens_per_s']:14.0f}")
    base, packed = results
    print(f"packed / one per row: Stage 0 {packed['stage0_tokens_per_s'] / base['stage0_tokens_per_s']:.2f}x, "
          f"Stage 1 {packed['stage1_tokens_per_s'] / base['stage1_tokens_per_s']:.2f}x")
    return results


if __name__ == "__main__":
    main()
