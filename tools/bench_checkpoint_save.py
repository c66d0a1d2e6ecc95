"""Checkpoint save time with and without the checksum manifest (training.checkpoint_manifest), one run.

One process, the tiny Qwen3 preset with MoClip state after one real step; `save_checkpoint` is timed
alternately as is and with the per-file hashing and the manifest switched off (what a save was before
them), `--repeats` times each; printed: median seconds of both and their ratio.

    python tools/bench_checkpoint_save.py                     # CPU, qwen3-tiny
    python tools/bench_checkpoint_save.py --preset qwen3-0.6b --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch


@contextmanager
def _without_checksums():
    """save_checkpoint as it was before the manifest: no hashing, no checksums.json."""
    from replay_megatron.training import checkpointing

    hashed, write = checkpointing.hash_saved_files, checkpointing.write_manifest
    checkpointing.hash_saved_files, checkpointing.write_manifest = (lambda directory: {}), (lambda d, h: None)
    try:
        yield
    finally:
        checkpointing.hash_saved_files, checkpointing.write_manifest = hashed, write


def _one_step(model, optimizer, hf: dict, seq: int) -> None:
    from replay_megatron.data.dataset import make_batch
    from replay_megatron.training.objectives import FullVocabCE
    from replay_megatron.training.step import train_step

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf["vocab_size"], (seq + 1,), generator=g).numpy()
    batch = make_batch([{"sample_id": 0, "tokens": ids, "loss_mask": [1.0] * (seq + 1)}], seq, 0)
    train_step(model, optimizer, [batch.to(next(model.parameters()).device)], FullVocabCE())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()

    from replay_megatron.models.presets import preset
    from replay_megatron.optim.megatron import build_optimizer
    from replay_megatron.platform.distributed import initialize, shutdown
    from replay_megatron.training.checkpointing import TrainState, save_checkpoint
    from replay_megatron.training.setup import build_ddp_model

    hf = preset(args.preset)
    layout = initialize(device=args.device)
    try:
        model = build_ddp_model(hf, layout)
        optimizer = build_optimizer("moclip", [model], lr=1e-3)
        _one_step(model, optimizer, hf, args.seq)
        times: dict[str, list[float]] = {"without checksums": [], "with checksums": []}
        with tempfile.TemporaryDirectory() as run_dir:
            for i in range(2 * args.repeats + 2):  # alternate; the first pair warms up
                variant = "with checksums" if i % 2 else "without checksums"
                with _without_checksums() if variant == "without checksums" else nullcontext():
                    start = time.perf_counter()
                    save_checkpoint(Path(run_dir), TrainState(step=1), model, optimizer, hf)
                    elapsed = time.perf_counter() - start
                if i >= 2:
                    times[variant].append(elapsed)
            size = sum(p.stat().st_size for p in (Path(run_dir) / "checkpoints").rglob("*") if p.is_file())
        base, new = (statistics.median(times[k]) for k in ("without checksums", "with checksums"))
        print(f"{args.preset} on {layout.device.type}, checkpoint {size / 1e6:.2f} MB, median of {args.repeats} saves:")
        print(f"  without checksums {base * 1e3:8.1f} ms")
        print(f"  with checksums    {new * 1e3:8.1f} ms")
        print(f"  ratio {new / base:.3f} (save time +{100 * (new / base - 1):.1f}%)")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
