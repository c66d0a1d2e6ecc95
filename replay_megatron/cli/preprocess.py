"""`replay-megatron preprocess`: SFT data (JSONL / JSON / Parquet, several shapes) or plain text -> token store."""
from __future__ import annotations

import argparse
import sys

HELP = "tokenize SFT data (JSONL, JSON, Parquet) or plain text into a token store with loss masks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from replay_megatron.data.preprocess import FORMATS, TRUNCATIONS

    parser.add_argument("--input", required=True, action="append",
                        help=".jsonl / .json / .parquet file in the --format shape, or a text file; repeat it to "
                             "put several files into one store, in order (every file is checked before the "
                             "store is written)")
    parser.add_argument("--tokenizer", required=True,
                        help="sentencepiece .model file, or a Hugging Face tokenizer directory (chat template used)")
    parser.add_argument("--out", required=True, help="token store directory to write")
    parser.add_argument("--seq-length", type=int, required=True, help="model sequence length")
    parser.add_argument("--format", choices=FORMATS, default="instruction",
                        help="instruction {prompt, response}, chat {messages: [{role, content}]}, alpaca "
                             "{instruction, input, output}, sharegpt {conversations: [{from, value}]}, "
                             "or text (one sample per line, loss on every token)")
    parser.add_argument("--map", action="append", default=[], metavar="NAME=FIELD",
                        help="read field NAME of the format from FIELD (e.g. prompt=question, messages=dialog, "
                             "role:assistant=bot); repeat it or separate entries with commas")
    parser.add_argument("--loss-on", choices=("all", "last"), default="all",
                        help="train on every assistant turn of a conversation, or on the last one only")
    parser.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="pass enable_thinking to the chat template (Qwen3); default: the template's own")
    parser.add_argument("--train-empty-think", action="store_true",
                        help="train on the empty <think></think> block a thinking template puts before an answer")
    parser.add_argument("--truncation", choices=TRUNCATIONS, default="tail",
                        help="a sample longer than seq_length + 1 tokens keeps its loss-bearing tail, or is dropped")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="add the samples to an existing store")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from replay_megatron.cli._config_args import refuse
    from replay_megatron.data.chat import ChatOptions
    from replay_megatron.data.formats import parse_map
    from replay_megatron.data.preprocess import DataError, preprocess

    mode = "append" if args.append else "overwrite" if args.overwrite else "create"
    try:
        mapping = parse_map(args.map, args.format)
        chat = ChatOptions(loss_on=args.loss_on, enable_thinking=args.enable_thinking,
                           train_empty_think=args.train_empty_think)
        meta = preprocess(args.input, args.tokenizer, args.out, args.seq_length, fmt=args.format,
                          workers=args.workers, mode=mode, progress=False if args.no_progress else None,
                          mapping=mapping, chat=chat, truncation=args.truncation)
    except (DataError, FileNotFoundError, ValueError) as e:
        refuse("preprocess", e)
    _report(args, meta)
    return 0


def _report(args: argparse.Namespace, meta: dict) -> None:
    added = meta["sources"][-len(args.input):]
    print(f"{args.out}: {sum(s['num_samples'] for s in added)} samples added ({meta['num_samples']} in store, "
          f"{meta['num_tokens']} tokens, {meta['num_loss_tokens']} loss-bearing, padding "
          f"{meta['padding_fraction']:.1%} of seq_length {args.seq_length} rows), "
          f"fingerprint {meta['fingerprint'][:16]}")
    what = {"truncated": f"were longer than seq_length + 1 = {args.seq_length + 1} tokens and keep their "
                         f"loss-bearing tail",
            "dropped_too_long": f"were longer than seq_length + 1 = {args.seq_length + 1} tokens and were dropped",
            "dropped_without_loss": "had no loss-bearing token left and were dropped"}
    for key, text in what.items():
        n = sum(s[key] for s in added)
        if n:
            print(f"warning: {n} samples {text}", file=sys.stderr)
