"""`replay-megatron convert`: Hugging Face Qwen3 dir <-> megatron-core distributed checkpoint (any TP/PP).

    replay-megatron convert hf-to-megatron --hf DIR --out DIR --tp N --pp M
    replay-megatron convert megatron-to-hf --mcore DIR --out DIR [--tokenizer PATH] [--max-shard-size GB]

hf-to-megatron, launched by torchrun/msrun with TP*PP ranks, converts in place, otherwise it spawns the
ranks itself; megatron-to-hf streams the checkpoint into a complete HF directory in this process.
"""
from __future__ import annotations

import argparse

HELP = "convert Qwen3 checkpoints between Hugging Face safetensors and megatron-core (any TP/PP)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    to_mcore = sub.add_parser("hf-to-megatron", help="HF safetensors dir -> Megatron dist checkpoint")
    to_mcore.add_argument("--hf", required=True, help="HF model dir (config.json + safetensors)")
    to_mcore.add_argument("--out", required=True, help="output Megatron checkpoint dir")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    to_hf = sub.add_parser("megatron-to-hf", help="Megatron dist checkpoint (any TP/PP) -> HF dir")
    to_hf.add_argument("--mcore", required=True, help="Megatron checkpoint dir written by hf-to-megatron/training")
    to_hf.add_argument("--out", required=True, help="output HF model dir (replaced whole)")
    to_hf.add_argument("--tokenizer", help="the model's tokenizer: sentencepiece .model file or HF dir (copied "
                                           "into the export with its chat template); without it: weights only")
    to_hf.add_argument("--max-shard-size", type=float, default=5.0, help="GB per safetensors shard (default 5)")
    to_mcore.add_argument("--device", default="cpu", choices=["cpu", "cuda", "npu", "auto"],
                          help="device the conversion ranks run on (default cpu)")


def run(args: argparse.Namespace) -> int:
    from replay_megatron.models.checkpoint import convert_hf_to_megatron
    from replay_megatron.training.export import export_hf

    if args.direction == "hf-to-megatron":
        convert_hf_to_megatron(args.hf, args.out, args.tp, args.pp, args.device)
        print(f"wrote Megatron checkpoint (TP{args.tp} x PP{args.pp}) to {args.out}")
    else:
        export_hf(args.mcore, args.out, args.tokenizer, max_shard_bytes=int(args.max_shard_size * 10 ** 9))
        print(f"wrote Hugging Face model to {args.out}")
    return 0
