"""Cross-field checks of a validated config: the model shape against TP/PP, batches against DP, stages' inputs.

Each check returns `Problem`s (dotted key + message) so the loader can name the file that set the key.
"""
from __future__ import annotations

from replay_megatron.config.errors import ConfigError, Problem
from replay_megatron.config.model_shape import ModelShape, model_hf_config
from replay_megatron.config.schema import ReplayConfig
from replay_megatron.optim.registry import COMMON_FIELDS, optimizer_spec

SUPPORTED_MODEL_TYPES = ("qwen3",)


def world_and_dp(cfg: ReplayConfig, world_size: int | None) -> tuple[int, int]:
    """(world size, DP size); the world defaults to TP x PP (DP = 1). DP is 0 if TP x PP does not divide it."""
    mp = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    world = mp if world_size is None else world_size
    return world, (world // mp if world % mp == 0 else 0)


def check_config(cfg: ReplayConfig, world_size: int | None = None) -> list[Problem]:
    """Every cross-field problem of `cfg` at `world_size` (None: TP x PP); empty when the config is consistent."""
    try:
        hf = model_hf_config(cfg)
    except ConfigError as e:
        return e.causes
    problems = _check_model(cfg, hf, ModelShape.from_hf(hf))
    problems += _check_batches(cfg, world_size)
    problems += _check_stages(cfg)
    problems += _check_optimizer_fields(cfg)
    problems += _check_muon(cfg)
    return problems


def _check_model(cfg: ReplayConfig, hf: dict, shape: ModelShape) -> list[Problem]:
    out = []
    if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        out.append(Problem("model", f"model_type {hf.get('model_type')!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})", has_value=False))
    tp = cfg.parallel.tensor_model_parallel_size
    split = {"num_attention_heads": shape.num_heads, "num_key_value_heads (query groups)": shape.num_kv_heads,
             "intermediate_size": shape.ffn_hidden_size}
    bad = [f"{what} = {n}" for what, n in split.items() if n % tp]
    if bad:
        valid = [d for d in _divisors(shape.num_heads) if all(n % d == 0 for n in split.values())]
        out.append(Problem("parallel.tensor_model_parallel_size",
                           f"TP must divide the model's {', '.join(bad)}; valid TP: {valid}", tp))
    pp = cfg.parallel.pipeline_model_parallel_size
    if shape.num_layers % pp:
        out.append(Problem("parallel.pipeline_model_parallel_size",
                           f"PP must divide the model's num_hidden_layers = {shape.num_layers}; "
                           f"valid PP: {_divisors(shape.num_layers)}", pp))
    if cfg.data.seq_length > shape.max_positions:
        out.append(Problem("data.seq_length", f"exceeds the model's max_position_embeddings = "
                                              f"{shape.max_positions}", cfg.data.seq_length))
    return out


def _check_batches(cfg: ReplayConfig, world_size: int | None) -> list[Problem]:
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    world, dp = world_and_dp(cfg, world_size)
    if dp == 0:
        return [Problem("parallel", f"world size {world} is not divisible by TP x PP = {tp} x {pp} = {tp * pp}",
                        has_value=False)]
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        return [Problem("train.global_batch_size",
                        f"must be divisible by train.micro_batch_size x DP = {t.micro_batch_size} x {dp} = "
                        f"{t.micro_batch_size * dp} (world {world} = TP {tp} x PP {pp} x DP {dp})",
                        t.global_batch_size)]
    return []


def _check_stages(cfg: ReplayConfig) -> list[Problem]:
    out = []
    t = cfg.train
    if t.loss == "replay" and t.replay_store is None:
        out.append(Problem("train.replay_store", "train.loss=replay needs a replay store: set train.replay_store "
                                                 "(or collect.store_dir)", None))
    if t.kl_weight > 0 and t.replay_store == cfg.collect.store_dir and cfg.collect.store_logits == "none":
        out.append(Problem("train.kl_weight", "the KL term needs teacher logits, but this config's Stage 0 "
                                              "stores none (set collect.store_logits)", t.kl_weight))
    return out


def _check_optimizer_fields(cfg: ReplayConfig) -> list[Problem]:
    """Every optimizer.* field the config sets to other than its default is read by the optimizer it
    names (else the setting would silently do nothing). Defaults pass: resolved.yaml lists every field."""
    o = cfg.optimizer
    read = COMMON_FIELDS | optimizer_spec(o.name).fields
    unread = [f for f in sorted(o.model_fields_set - read) if getattr(o, f) != type(o).model_fields[f].default]
    return [Problem(f"optimizer.{field}", f"optimizer {o.name!r} does not read it (it reads "
                                          f"{', '.join(sorted(read - {'name'}))}); remove it", getattr(o, field))
            for field in unread]


def _check_muon(cfg: ReplayConfig) -> list[Problem]:
    """megatron-core's Muon refuses the distributed optimizer and fp16 (its own checks, raised here first)."""
    if not optimizer_spec(cfg.optimizer.name).muon:
        return []
    out = []
    if cfg.parallel.distributed_optimizer:
        out.append(Problem("parallel.distributed_optimizer", f"optimizer {cfg.optimizer.name!r} runs on "
                           "megatron-core's Muon, which does not support the distributed optimizer; set it false",
                           True))
    if cfg.model.params_dtype == "fp16":
        out.append(Problem("model.params_dtype", f"optimizer {cfg.optimizer.name!r} runs on megatron-core's Muon, "
                           "which does not support fp16 (use bf16 or fp32)", "fp16"))
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
