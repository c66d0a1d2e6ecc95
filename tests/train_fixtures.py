"""A tiny training setup for the train/eval/report tests: token stores and a config on a preset Qwen3.

Token data: random ids below 500 (the tiny preset's vocabulary is 512), instruction-like loss masks.
The config runs Stage 0 and Stage 1 on CPU in seconds; tests override what they vary.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from replay_megatron.data.synthetic import write_random_token_store

SEQ = 24


def write_token_store(out: Path, n: int, seed: int, tokenizer_fp: str = "test-tokenizer") -> None:
    """n samples of 8..SEQ+1 tokens, loss on the tail of each."""
    write_random_token_store(out, n, seed, seq_length=SEQ, vocab_size=500, tokenizer_fingerprint=tokenizer_fp)


def make_training_root(root: Path) -> Path:
    """Token stores `tokens` (16 samples) and `heldout` (6) and `cfg.yaml` under `root`; returns the config."""
    write_token_store(root / "tokens", 16, seed=0)
    write_token_store(root / "heldout", 6, seed=1)
    body = {"run": {"name": "run", "data_root": str(root), "out_dir": str(root / "runs"), "seed": 7},
            "platform": {"device": "cpu"},
            "model": {"preset": "qwen3-tiny", "params_dtype": "fp32"},
            "data": {"train": "tokens", "eval": "heldout", "seq_length": SEQ},
            "collect": {"tau": 0.9, "k_max": 16, "micro_batch_size": 2, "store_dir": "store",
                        "positions": {"strategy": "bucket", "amount": 0.5, "buckets": 2}},
            "train": {"loss": "replay", "global_batch_size": 4, "micro_batch_size": 1, "train_iters": 6,
                      "epochs": None, "save_interval": 3, "export_hf": False},
            "optimizer": {"name": "moclip", "lr": 1e-3},
            "eval": {"micro_batch_size": 2},
            "logging": {"progress_bar": False, "tensorboard": False}}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def collect_job(config_path: str, overrides_list: list[list[str]]) -> None:
    """On one spawned rank: `collect` once per overrides list (a store each), tearing down between them."""
    from replay_megatron.config import load_config
    from replay_megatron.platform.distributed import shutdown
    from replay_megatron.replay.collect import collect

    for overrides in overrides_list:
        try:
            collect(load_config(config_path, overrides), world_size=1, progress=False)
        finally:
            shutdown()


def training_root_with_stores(root: Path, *overrides_list: list[str]) -> str:
    """`make_training_root` plus its replay store(s), collected in a spawned rank; returns the config path."""
    from replay_megatron.platform.spawn import run_local

    path = make_training_root(root)
    run_local(collect_job, 1, str(path), list(overrides_list))
    return str(path)
