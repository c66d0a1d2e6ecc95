"""`replay-megatron preprocess`: JSONL instruction data or plain text -> token store with loss masks."""
from __future__ import annotations

import argparse
import sys

HELP = "tokenize JSONL instruction data (or plain text) into a token store with loss masks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, action="append",
                        help="JSONL file ({prompt, response[, id]} per line) or text file; repeat it to put several "
                             "files into one store, in order (the later ones appended)")
    parser.add_argument("--tokenizer", required=True,
                        help="sentencepiece .model file, or a Hugging Face tokenizer directory (chat template used)")
    parser.add_argument("--out", required=True, help="token store directory to write")
    parser.add_argument("--seq-length", type=int, required=True, help="model sequence length; longer samples are truncated")
    parser.add_argument("--format", choices=("instruction", "text"), default="instruction")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="add the samples to an existing store")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from replay_megatron.cli._config_args import refuse
    from replay_megatron.data.preprocess import DataError, preprocess

    from pathlib import Path

    missing = [path for path in args.input if not Path(path).is_file()]
    if missing:  # all inputs first: a later missing one must not leave an overwritten store half-built
        refuse("preprocess", f"input file not found: {', '.join(missing)}")
    mode = "append" if args.append else "overwrite" if args.overwrite else "create"
    for i, path in enumerate(args.input):
        try:
            meta = preprocess(path, args.tokenizer, args.out, args.seq_length, fmt=args.format, workers=args.workers,
                              mode=mode if i == 0 else "append", progress=False if args.no_progress else None)
        except (DataError, FileNotFoundError, ValueError) as e:
            refuse("preprocess", e)
        _report(args, meta)
    return 0


def _report(args: argparse.Namespace, meta: dict) -> None:
    source = meta["sources"][-1]
    print(f"{args.out}: {source['num_samples']} samples added ({meta['num_samples']} in store, "
          f"{meta['num_tokens']} tokens, {meta['num_loss_tokens']} loss-bearing), "
          f"fingerprint {meta['fingerprint'][:16]}")
    if source["truncated"]:
        print(f"warning: {source['truncated']} samples were longer than seq_length + 1 = {args.seq_length + 1} "
              f"tokens and were truncated", file=sys.stderr)
    if source["samples_without_loss"]:
        print(f"warning: {source['samples_without_loss']} samples have no loss-bearing token "
              f"(prompt fills the sequence)", file=sys.stderr)
