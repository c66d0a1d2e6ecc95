"""The typed schema of a replay-megatron config (pydantic v2): one model per YAML section, unknown keys forbidden.

Defaults are the paper's settings (SPEC.md section 6) where it states them; every other default is a
documented choice (the field's description says so). Checks that need the model shape or the world size
live in `config.checks`; checks here look at one section only.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from replay_megatron.config.errors import did_you_mean
from replay_megatron.models.presets import PRESETS
from replay_megatron.optim.registry import OPTIMIZERS

OptimizerName = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]  # the registry's names


class Section(BaseModel):
    """Base of every section: unknown keys are errors; defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunSection(Section):
    name: str = Field("run", min_length=1, description="run name; the run directory is <out_dir>/<name>")
    out_dir: str = Field("runs", description="parent directory of run directories (relative: to the working dir)")
    data_root: str = Field(".", description="base of every relative input path in data/model/collect/train/eval/"
                                            "preprocess (relative: to the working dir)")
    seed: int = Field(1234, ge=0, description="global seed (init, data order, position sampling; paper: 3 seeds)")


class PlatformSection(Section):
    device: Literal["auto", "cpu", "cuda", "npu"] = Field(
        "auto", description="accelerator: auto = npu if torch_npu works, else cuda, else cpu (gloo)")
    mindspeed_adaptor: Literal["auto", "on", "off"] = Field(
        "auto", description="MindSpeed's megatron adaptor (fused attention, RMSNorm, SwiGLU, RoPE on NPU): "
                            "auto = applied on an NPU where `mindspeed` is installed, on = always (refused "
                            "when it does not import), off = never. Untested without an NPU")

    @field_validator("mindspeed_adaptor", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        """YAML reads a bare on / off as a boolean."""
        return ("on" if v else "off") if isinstance(v, bool) else v


class ModelSection(Section):
    preset: str | None = Field(None, description="named shape from replay_megatron.models.presets "
                                                 "(exactly one of preset / hf_path)")
    hf_path: str | None = Field(None, description="HF checkpoint dir: shape from its config.json, weights unless "
                                                  "mcore_checkpoint is set (exactly one of preset / hf_path)")
    mcore_checkpoint: str | None = Field(None, description="start from this megatron-core checkpoint "
                                                           "(`replay-megatron convert` output)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="HF config.json keys replaced on top of "
                                                                        "the preset / checkpoint (e.g. vocab_size)")
    params_dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="dtype of model weights and "
                                                                              "activations (fp32 main params "
                                                                              "kept by the optimizer otherwise)")
    make_vocab_size_divisible_by: int = Field(1, ge=1, description="vocab padded to a multiple of this x TP "
                                                                   "(SPEC: a multiple of TP; megatron uses 128)")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown preset{did_you_mean(v, PRESETS)}; choose one of "
                             f"{', '.join(repr(p) for p in PRESETS)}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.preset is None) == (self.hf_path is None):
            got = "both" if self.preset is not None else "neither"
            raise ValueError(f"set exactly one of model.preset or model.hf_path (got {got})")
        return self


class ParallelSection(Section):
    tensor_model_parallel_size: int = Field(1, ge=1, description="TP: must divide attention heads and KV heads")
    pipeline_model_parallel_size: int = Field(1, ge=1, description="PP: must divide the number of layers")
    sequence_parallel: StrictBool = Field(False, description="megatron sequence parallelism (needs TP > 1)")
    distributed_optimizer: StrictBool = Field(False, description="shard fp32 main params and optimizer state "
                                                                 "over DP (megatron distributed optimizer)")

    @model_validator(mode="after")
    def _sp_needs_tp(self) -> ParallelSection:
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
        return self


class PreprocessSection(Section):
    train_input: str | None = Field(None, description="raw training data for `preprocess`: JSONL / JSON / Parquet "
                                                      "records (see format) or plain text")
    eval_input: str | None = Field(None, description="raw held-out data for `preprocess` (optional)")
    format: Literal["instruction", "chat", "alpaca", "sharegpt", "text"] = Field(
        "instruction", description="instruction {prompt, response}, chat {messages}, alpaca {instruction, input, "
                                   "output}, sharegpt {conversations}: loss on the assistant turns (chat template); "
                                   "text = plain text, loss on every token")
    map: list[str] = Field(default_factory=list, description="field renames NAME=FIELD (`preprocess --map`)")
    loss_on: Literal["all", "last"] = Field("all", description="train on every assistant turn or the last one")
    enable_thinking: bool | None = Field(None, description="enable_thinking for the chat template (Qwen3); "
                                                           "None = the template's default")
    truncation: Literal["tail", "drop"] = Field("tail", description="a sample longer than seq_length + 1 keeps its "
                                                                    "loss-bearing tail, or is dropped")


class DataSection(Section):
    train: str | None = Field(None, description="training token store dir (`preprocess` output)")
    eval: str | None = Field(None, description="held-out token store dir for perplexity (optional)")
    seq_length: int = Field(4096, ge=8, description="tokens per sample (paper: 4096)")
    tokenizer: str | None = Field(None, description="HF tokenizer dir or sentencepiece .model file")
    packing: StrictBool = Field(False, description="several samples per seq_length row (block-diagonal attention, "
                                                   "positions restarting per sample); batch sizes then count rows")


class PositionsSection(Section):
    strategy: Literal["all", "random", "last", "bucket"] = Field(
        "bucket", description="which loss-bearing positions Stage 0 stores (SPEC 1; paper: bucket)")
    amount: int | float = Field(0.5, description="n per sample: float in (0,1] = fraction of loss-bearing "
                                                 "positions, int >= 1 = count (paper silent; 0.5 is our choice)")
    buckets: int = Field(5, ge=1, description="confidence buckets B for strategy=bucket (paper: 5)")

    @field_validator("amount", mode="before")
    @classmethod
    def _amount(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a fraction in (0, 1] (float) or a count >= 1 (int)")
        if isinstance(v, int) and v < 1:
            raise ValueError("a count (int) must be >= 1")
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError("a fraction (float) must be in (0, 1]")
        return v


class CollectSection(Section):
    tau: float = Field(0.95, gt=0.0, le=1.0, description="cumulative-mass threshold of dynamic Top-K (paper: 0.95)")
    k_max: int = Field(200, ge=1, description="cap K_max on the candidate count (paper: 200)")
    positions: PositionsSection = Field(default_factory=PositionsSection, description="position selection")
    store_logits: Literal["none", "fp16", "bf16", "fp32"] = Field(
        "none", description="also store candidate logits + full log-sum-exp in this dtype (needed for kl_weight)")
    store_dir: str | None = Field(None, description="output dir of the replay store (Stage 0)")
    micro_batch_size: int = Field(1, ge=1, description="samples per forward pass in Stage 0")


class TrainSection(Section):
    loss: Literal["replay", "full"] = Field("replay", description="replay = restricted CE on stored S_t "
                                                                  "(SPEC 2); full = full-vocabulary SFT")
    kl_weight: float = Field(0.0, ge=0.0, description="weight of the KL term on S_t (needs stored logits; "
                                                      "0 = off = the paper)")
    replay_store: str | None = Field(None, description="replay store dir read by Stage 1 "
                                                       "(default: collect.store_dir)")
    global_batch_size: int = Field(16, ge=1, description="samples per optimizer step (paper: 16)")
    micro_batch_size: int = Field(1, ge=1, description="samples per forward/backward on one DP rank")
    train_iters: int | None = Field(None, ge=1, description="optimizer steps (exactly one of train_iters / "
                                                            "epochs; default: epochs=1)")
    epochs: int | None = Field(None, ge=1, description="passes over data.train (paper: 1 replay epoch)")
    save_interval: int | None = Field(None, ge=1, description="checkpoint every N steps (a final one is "
                                                              "always saved)")
    eval_interval: int | None = Field(None, ge=1, description="held-out perplexity every N steps (None = end only)")
    log_interval: int = Field(1, ge=1, description="metrics line every N steps")
    max_consecutive_nonfinite: int = Field(10, ge=1, description="abort (after saving) after N skipped "
                                                                 "non-finite steps in a row")
    export_hf: StrictBool = Field(True, description="export the final weights as a HF checkpoint")

    @model_validator(mode="after")
    def _one_length(self) -> TrainSection:
        if self.train_iters is not None and self.epochs is not None:
            raise ValueError("set exactly one of train.train_iters or train.epochs (got both; set the other to null)")
        if self.train_iters is None and self.epochs is None:
            self.epochs = 1
        if self.kl_weight > 0 and self.loss != "replay":
            raise ValueError("train.kl_weight > 0 needs train.loss=replay (the KL term lives on S_t)")
        return self


class OptimizerSection(Section):
    name: OptimizerName = Field("moclip", description="optimizer (SPEC 3-4)")
    lr: float = Field(1.25e-6, gt=0.0, description="peak learning rate (paper: 1.25e-6)")
    min_lr: float = Field(0.0, ge=0.0, description="final lr of the cosine/linear schedule")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="decay after warm-up (paper silent; constant is our choice)")
    warmup_iters: int = Field(0, ge=0, description="linear warm-up steps from 0 to lr")
    weight_decay: float = Field(0.01, ge=0.0, description="decoupled weight decay (paper silent; torch/megatron "
                                                          "default 0.01)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="(beta1, beta2) of the moments (SPEC 3)")
    clip_grad: float = Field(1.0, ge=0.0, description="megatron global grad-norm clip before the optimizer "
                                                      "(0 = off; megatron default 1.0)")
    max_angle: float = Field(45.0, gt=0.0, le=180.0, description="MoClip angle cap in degrees, (0, 180] "
                                                                 "(paper: 45; 180 = no clipping)")
    atan2_a: float = Field(1.0, gt=0.0, description="atan2 scale a (paper eq. 8: 1; Adam-atan2: 1.27)")
    atan2_b: float = Field(1.0, gt=0.0, description="atan2 denominator scale b (paper: 1)")
    clip_mode: Literal["paper", "rotate"] = Field("paper", description="MoClip clipping rule (SPEC 3 step 2)")
    eps: float = Field(1e-8, ge=0.0, description="epsilon: Adam denominator (adamw, moclip_adam_eps, mofo, "
                                                 "adamuon); damping floor of tam")
    tam_gamma: float = Field(0.9, ge=0.0, lt=1.0, description="TAM smoothing of the cosine (SPEC 4: 0.9)")
    tam_variant: Literal["plain", "cosine"] = Field("plain", description="TAM as published, or the paper's "
                                                                         "variant scaling the update by cos(phi)")
    mofo_fraction: float = Field(0.2, gt=0.0, le=1.0, description="MoFO: fraction of entries updated per tensor "
                                                                  "(paper: 0.2)")
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0, description="momentum of Muon (adamuon, muonclip)")
    attention_clip_grad: float = Field(1.0, gt=0.0, description="MuonClip as the paper ran it: max gradient norm "
                                                                "of the attention layers (paper silent)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _combos(self) -> OptimizerSection:
        if self.min_lr > self.lr:
            raise ValueError(f"optimizer.min_lr ({self.min_lr}) must be <= optimizer.lr ({self.lr})")
        if self.name == "adam_atan2":
            # SPEC 4: Adam-atan2 is MoClip with no clipping; an explicit other angle is a contradiction.
            if "max_angle" in self.model_fields_set and not math.isclose(self.max_angle, 180.0):
                raise ValueError("optimizer.name=adam_atan2 is MoClip without clipping: optimizer.max_angle "
                                 f"must be 180 (got {self.max_angle})")
            self.max_angle = 180.0
        if self.name == "moclip_adam_eps" and self.eps == 0.0:
            raise ValueError("optimizer.name=moclip_adam_eps divides by sqrt(v)+eps: optimizer.eps must be > 0")
        return self


class DomainEvalSection(Section):
    task: Literal["sql_execution"] = Field("sql_execution", description="domain metric (SPEC 5): execution "
                                                                        "accuracy of generated SQL")
    data: str = Field(description="domain eval set (JSONL) for the task")
    max_new_tokens: int = Field(256, ge=1, description="generation budget per example")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N examples")


class LmEvalSection(Section):
    tasks: list[str] = Field(min_length=1, description="lm-evaluation-harness task names (e.g. mmlu, bbh, or "
                                                       "local tasks from include_path)")
    include_path: str | None = Field(None, description="dir of custom task YAMLs (lm-eval --include_path)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (None = each task's default)")
    limit: float | None = Field(None, gt=0, description="documents per task: a count, or a fraction when < 1")
    batch_size: int = Field(1, ge=1, description="lm-eval batch size")
    apply_chat_template: StrictBool = Field(False, description="render prompts with the tokenizer's chat template")


class EvalSection(Section):
    micro_batch_size: int = Field(1, ge=1, description="samples per forward pass in held-out evaluation")
    max_batches: int | None = Field(None, ge=1, description="stop after N micro-batches (None = whole set)")
    base_checkpoint: str | None = Field(None, description="weights theta_base of the relative L2 distance "
                                                          "(None = the run's starting weights)")
    domain: DomainEvalSection | None = Field(None, description="domain metric through the HF export")
    lm_eval: LmEvalSection | None = Field(None, description="lm-evaluation-harness on the base's and the "
                                                            "fine-tuned HF exports (the [eval] extra)")


class LoggingSection(Section):
    tensorboard: StrictBool = Field(True, description="write TensorBoard events when tensorboard is installed")
    jsonl: StrictBool = Field(True, description="write per-step metrics.jsonl in the run dir")
    progress_bar: StrictBool = Field(True, description="progress bar on rank 0 (a periodic line when not a tty)")
    spike_window: int = Field(50, ge=2, description="trailing window of the loss-spike metric (SPEC 5: 50)")
    spike_sigma: float = Field(3.0, gt=0.0, description="spike = loss > window mean + sigma x std (SPEC 5: 3)")
    stability_skip_iters: int | None = Field(None, ge=0, description="steps left out of the stability metrics "
                                                                     "(None = optimizer.warmup_iters)")


class ReplayConfig(Section):
    """A whole run: which model, how it is split, what data, Stage 0 and Stage 1 settings, logging."""

    description: str = Field("", description="one line saying what this config reproduces")
    run: RunSection = Field(default_factory=RunSection, description="run identity and paths")
    platform: PlatformSection = Field(default_factory=PlatformSection, description="device selection")
    model: ModelSection = Field(description="model shape and starting weights")
    parallel: ParallelSection = Field(default_factory=ParallelSection, description="TP / PP layout")
    preprocess: PreprocessSection = Field(default_factory=PreprocessSection, description="raw data inputs")
    data: DataSection = Field(default_factory=DataSection, description="token stores and sequence length")
    collect: CollectSection = Field(default_factory=CollectSection, description="Stage 0: dynamic Top-K")
    train: TrainSection = Field(default_factory=TrainSection, description="Stage 1 / SFT training loop")
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection, description="optimizer and schedule")
    eval: EvalSection = Field(default_factory=EvalSection, description="held-out perplexity, L2, domain")
    logging: LoggingSection = Field(default_factory=LoggingSection, description="metrics outputs")

    @model_validator(mode="after")
    def _store_default(self) -> ReplayConfig:
        # Stage 1 reads what Stage 0 wrote unless told otherwise.
        if self.train.replay_store is None and self.collect.store_dir is not None:
            self.train.replay_store = self.collect.store_dir
        return self

    def input_path(self, value: str | None) -> Path | None:
        """An input path of this config (data, stores, checkpoints) resolved against `run.data_root`."""
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.run.data_root).expanduser() / path

    @property
    def run_dir(self) -> Path:
        """The run directory `<run.out_dir>/<run.name>` (checkpoints, metrics, resolved.yaml)."""
        return Path(self.run.out_dir).expanduser() / self.run.name
