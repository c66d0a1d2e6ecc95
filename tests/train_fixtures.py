"""A tiny training setup for the train/eval/report tests: token stores and a config on a preset Qwen3.

Token data: random ids below 500 (the tiny preset's vocabulary is 512), instruction-like loss masks.
The config runs Stage 0 and Stage 1 on CPU in seconds; tests override what they vary.
"""
from __future__ import annotations

from pathlib import Path

import torch
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




def make_micro_batches(hf, n=2, b=2, s=16):
    from replay_megatron.data.dataset import make_batch

    g = torch.Generator().manual_seed(3)
    out = []
    for m in range(n):
        samples = []
        for i in range(b):
            length = int(torch.randint(8, s + 2, (1,), generator=g))
            tokens = torch.randint(1, hf["vocab_size"], (length,), generator=g).numpy()
            loss_mask = (torch.arange(length) >= length // 3).to(torch.uint8).numpy()
            samples.append({"sample_id": m * b + i, "tokens": tokens, "loss_mask": loss_mask})
        out.append(make_batch(samples, s, pad_id=0))
    return out


def stage_from_hf(stage, hf_state_dict, hf, layout) -> dict[str, torch.Tensor]:
    """The tensors of a stage shaped like this rank's `stage` (its TP shard and pipeline stage) loaded from
    an HF state dict, keyed by `stage`'s parameter names."""
    from replay_megatron.models.conversion import load_hf_into_model
    from replay_megatron.models.qwen3 import build_model

    carrier = build_model(hf, stage.config, pre_process=layout.is_first_stage, post_process=layout.is_last_stage)
    load_hf_into_model(carrier, hf_state_dict, hf, tp=layout.tp, tp_rank=layout.tp_rank)
    return {n: p.detach() for n, p in carrier.named_parameters()}


def param_differences(stage, expected_hf_state_dict, hf, layout) -> list:
    """|difference| per parameter between this rank's trained stage and the same stage loaded from an HF
    state dict."""
    reference = stage_from_hf(stage, expected_hf_state_dict, hf, layout)
    return [(p.detach() - reference[n]).abs() for n, p in stage.named_parameters()]


@torch.no_grad()
def main_grads_to_hf(stage, hf) -> dict[str, torch.Tensor]:
    """The gradients the optimizer sees (DDP's `main_grad`) of a whole (TP1, PP1) stage, in HF names and
    layouts: the weight conversion is slicing and permutation, so it maps gradients the same way."""
    from replay_megatron.models.conversion import model_to_hf
    from replay_megatron.models.qwen3 import build_model

    carrier = build_model(hf, stage.config, pre_process=True, post_process=True)
    params = dict(carrier.named_parameters())
    for name, p in stage.named_parameters():
        params[name].copy_(p.main_grad)
    return model_to_hf(carrier, hf)


@torch.no_grad()
def set_main_grads_from_hf(stage, hf_grads, hf, layout) -> None:
    """Each `main_grad` of this rank's stage := its shard of HF-named logical gradients. A tied output
    layer's copy on the last stage gets the embedding's, as megatron's embedding all-reduce leaves it."""
    grads = stage_from_hf(stage, hf_grads, hf, layout)
    for name, p in stage.named_parameters():
        p.main_grad.copy_(grads[name])


def max_deviation(stage, expected_hf_state_dict, hf, layout) -> float:
    """Largest |difference| between this rank's trained stage and the same stage loaded from an HF state dict."""
    return max(d.max().item() for d in param_differences(stage, expected_hf_state_dict, hf, layout))


def tiny_model_and_steps(n_steps: int) -> tuple[dict, dict, list]:
    """The tiny Qwen3's HF config and weights, and `n_steps` steps of two micro-batches each."""
    from qwen3_fixtures import hf_state_dict, tiny_hf_config, tiny_hf_model

    hf = tiny_hf_config("qwen3-tiny")
    batches = make_micro_batches(hf, n=2 * n_steps)
    return hf, hf_state_dict(tiny_hf_model(hf)), [batches[2 * i: 2 * i + 2] for i in range(n_steps)]


def collect_job(config_path: str, overrides_list: list[list[str]]) -> None:
    """On one spawned rank: `collect` once per overrides list (a store each), tearing down between them."""
    from replay_megatron.config import load_config
    from replay_megatron.platform.distributed import shutdown
    from replay_megatron.runs.collect import collect

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
