"""`replay-megatron make-demo-data`: the demo's generated corpora, SQLite databases and tokenizer."""
from __future__ import annotations

import argparse


HELP = "generate the demo data (general tasks + NL2SQL over SQLite) and train its sentencepiece tokenizer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from replay_megatron.demo.generate import DemoDataConfig

    d = DemoDataConfig()
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--general-train", type=int, default=d.general_train)
    parser.add_argument("--general-heldout", type=int, default=d.general_heldout)
    parser.add_argument("--domain-train", type=int, default=d.domain_train)
    parser.add_argument("--domain-heldout", type=int, default=d.domain_heldout)
    parser.add_argument("--num-databases", type=int, default=d.num_databases)
    parser.add_argument("--vocab-size", type=int, default=1024, help="upper bound on the tokenizer vocabulary")


def run(args: argparse.Namespace) -> int:
    from replay_megatron.data.tokenizer import SentencePieceTokenizer
    from replay_megatron.demo.generate import DemoDataConfig, generate_demo_data, train_demo_tokenizer

    cfg = DemoDataConfig(seed=args.seed, general_train=args.general_train, general_heldout=args.general_heldout,
                         domain_train=args.domain_train, domain_heldout=args.domain_heldout,
                         num_databases=args.num_databases)
    manifest = generate_demo_data(args.out, cfg)
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    print(f"{args.out}: {'reused' if manifest['reused'] else 'generated'} ({counts})")
    tok = SentencePieceTokenizer(train_demo_tokenizer(args.out, args.vocab_size))
    print(f"tokenizer {tok.path}: vocab {tok.vocab_size}, fingerprint {tok.fingerprint()[:16]}")
    return 0
