"""Qwen3 checkpoint conversion without the console script; same code as `replay-megatron convert`.

    python tools/convert_checkpoint.py hf-to-megatron --hf DIR --out DIR --tp N --pp M
    python tools/convert_checkpoint.py megatron-to-hf --mcore DIR --out DIR
"""
import sys

from replay_megatron.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
