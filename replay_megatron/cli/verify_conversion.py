"""`replay-megatron verify-conversion`: do a Megatron checkpoint (or an on-the-fly conversion) and the
Hugging Face model give the same logits? Prints max abs / max relative logit difference and max |delta
loss| (per-sequence mean next-token CE) on a seeded random token batch; exits 1 above --tol.

    replay-megatron verify-conversion --hf DIR --tp N --pp M [--mcore DIR] [--device cpu] [--tol 1e-4]
"""
from __future__ import annotations

import argparse

HELP = "compare Megatron (TP x PP) and Hugging Face logits for a converted Qwen3 checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="HF model dir (the reference, loaded with transformers)")
    parser.add_argument("--mcore", default=None, help="Megatron checkpoint dir; omitted: convert --hf on the fly")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "npu", "auto"])
    parser.add_argument("--tol", type=float, default=1e-4, help="max allowed |delta logit| (fp32)")
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234, help="seed of the random token batch")


def megatron_logits(hf_dir: str, mcore_dir: str | None, tokens, tp: int, pp: int, device: str):
    """On each rank: the fp32 Megatron model from `mcore_dir` (or `hf_dir`); full logits on last stage/tp 0."""
    from replay_megatron.models.checkpoint import read_hf_config
    from replay_megatron.models.forward import full_logits
    from replay_megatron.models.qwen3 import build_stage
    from replay_megatron.models.sources import load_weights
    from replay_megatron.platform.distributed import initialize, shutdown

    hf = read_hf_config(hf_dir)
    layout = initialize(device=device, tp=tp, pp=pp, num_layers=hf["num_hidden_layers"])
    try:
        model = build_stage(hf, layout)
        load_weights(model, mcore_dir or hf_dir, hf, layout)
        model.eval()
        logits = [x.cpu() for x in full_logits(model, [tokens.to(layout.device.torch_device)], hf["vocab_size"])]
    finally:
        shutdown()
    return logits if layout.is_last_stage and layout.tp_rank == 0 else None


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from replay_megatron.models.checkpoint import read_hf_config, run_on_ranks
    from replay_megatron.models.parity import compare_logits
    from replay_megatron.models.qwen3 import check_tp_fits

    hf = read_hf_config(args.hf)
    check_tp_fits(hf, args.tp)
    tokens = torch.randint(0, hf["vocab_size"], (args.batch, args.seq_length),
                           generator=torch.Generator().manual_seed(args.seed))
    reference = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(tokens).logits.float()
    source = args.mcore or f"{args.hf} (converted on the fly)"
    print(f"HF {args.hf} vs Megatron {source} at TP{args.tp} x PP{args.pp} on {args.device}, "
          f"batch {args.batch} x {args.seq_length} tokens (seed {args.seed})")
    results = run_on_ranks(megatron_logits, args.tp * args.pp, args.hf, args.mcore, tokens, args.tp, args.pp,
                           args.device)
    got = next((r for r in results if r is not None), None)
    if got is None:  # launched by torchrun: only the last stage's TP rank 0 holds the logits
        return 0
    report = compare_logits([expected], got, [tokens])
    print(report)
    if report.max_abs > args.tol:
        print(f"FAIL: max |delta logit| {report.max_abs:.3e} above --tol {args.tol:g}")
        return 1
    print(f"PASS (tolerance {args.tol:g})")
    return 0
