"""The demo's steps: data -> tokenizer -> token stores -> base pre-training and its eval -> Stage 0 -> the
comparison runs (each method, each seed) -> eval of each -> report, every one a `replay-megatron`
subcommand (runner.py runs them).

The configs in `configs/demo/` are the single source of what runs: the pre-training config names the
general corpus, the comparison configs (one per method) the NL2SQL set, the replay store and the eval
sets; `preprocess.train_input` / `eval_input` say which raw file becomes which token store. Every path is
relative to `run.data_root`, which the demo sets to its output dir, with runs under `<out>/runs`.

The base sees NL2SQL too: its pre-training corpus is the general corpus plus NL2SQL samples generated with
another seed (other databases and questions, `PRETRAIN_DOMAIN`), as a real base model has seen SQL before
its domain fine-tuning. Without it the base is confidently wrong on every SQL token, Stage 0's candidate
sets degenerate to {its wrong guess, gold}, and the comparison says nothing about the method.

The base is evaluated like the comparison runs (its pre-training run's `eval`: held-out perplexity and
domain accuracy through its HF export) and is the report's first column. With several seeds each
comparison run is repeated with `run.seed` = its config's seed + 0, 1, ... (the data order); the base and
the Stage 0 store are shared. The first seed's runs keep their place (`<out>/runs/<name>`), so a demo
re-run with more seeds reuses them; the others go to `<out>/runs/seed<seed>/<name>`.

`--quick` (the CI smoke run) keeps the shapes and the code paths and shrinks the work: a few hundred
generated samples, a few optimizer steps, two methods, a handful of eval examples (`QUICK_*` below).
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from replay_megatron.demo.generate import TOKENIZER_FILE, DemoDataConfig
from replay_megatron.demo.runner import Step
from replay_megatron import run_dir as layout_of_run

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "demo"
PRETRAIN = "pretrain"
MAIN_METHODS = ("sft_adamw", "topk_moclip", "sft_moclip", "topk_adamw")  # the comparison, then the mixed variants
# What each part of MoClip buys: atan2 without the clip, a wider cap, the rotate ablation of the clip.
ABLATIONS = ("topk_adam_atan2", "topk_moclip_60", "topk_moclip_rotate")
METHODS = MAIN_METHODS + ABLATIONS
QUICK_METHODS = MAIN_METHODS[:2]
# NL2SQL samples mixed into pre-training (about 9% of its corpus), from other databases than the domain set.
PRETRAIN_DOMAIN = DemoDataConfig(seed=1, general_train=0, general_heldout=0, domain_train=2000, domain_heldout=0)
QUICK_PRETRAIN_DOMAIN = DemoDataConfig(seed=1, general_train=0, general_heldout=0, domain_train=40, domain_heldout=0,
                                       num_databases=8)
QUICK_PRETRAIN = ("train.train_iters=16", "optimizer.warmup_iters=2")
QUICK_EVAL = ("eval.max_batches=1", "eval.domain.limit=6", "eval.domain.max_new_tokens=24", "eval.lm_eval.limit=16")
# Without lm-evaluation-harness (the [eval] extra) the demo runs without its benchmark.
NO_LM_EVAL = ("eval.lm_eval=null",)
QUICK_POSTTRAIN = ("train.train_iters=6", "optimizer.warmup_iters=1", *QUICK_EVAL)


def data_args(cfg: DemoDataConfig) -> tuple[str, ...]:
    """`make-demo-data` options giving `cfg`'s sizes."""
    return tuple(f"--{k.replace('_', '-')}={v}" for k, v in asdict(cfg).items())


def _resolved(cfg) -> str:
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def collect_step_inputs(cfg) -> str:
    """What a collect step reads of a method's config: a change elsewhere (optimizer, train) keeps its store."""
    sections = cfg.model_dump(mode="json", include={"model", "data", "collect", "parallel", "platform"})
    return json.dumps({**sections, "seed": cfg.run.seed}, sort_keys=True)


def _ranks(cfg) -> int:
    return cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size


def _run_complete(cfg) -> bool:
    """train finished all its steps (summary.json says so) and exported to HF when asked."""
    summary = cfg.run_dir / layout_of_run.SUMMARY
    if not summary.is_file() or json.loads(summary.read_text()).get("status") != "completed":
        return False
    return not cfg.train.export_hf or (cfg.run_dir / layout_of_run.HF_EXPORT / "config.json").is_file()


def demo_steps(out: Path, *, quick: bool = False, seed: int | None = None, seeds: int = 1,
               methods: Sequence[str] | None = None, config_dir: Path = CONFIG_DIR) -> list[Step]:
    """The demo's steps in order, for output dir `out` (absolute): `methods` (default MAIN_METHODS,
    QUICK_METHODS with `quick`) each trained `seeds` times."""
    from replay_megatron.config import load_config

    methods = tuple(methods or (QUICK_METHODS if quick else MAIN_METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods) or seeds < 1:
        raise ValueError(f"demo: methods must be distinct names from {', '.join(METHODS)} and seeds >= 1; "
                         f"got methods {', '.join(methods)}, seeds {seeds}")
    common = [f"run.data_root={out}", f"run.out_dir={out / 'runs'}"]
    if seed is not None:
        common.append(f"run.seed={seed}")
    pre_file = config_dir / f"{PRETRAIN}.yaml"
    without = list(NO_LM_EVAL) if importlib.util.find_spec("lm_eval") is None else []
    pre_over = common + list(QUICK_PRETRAIN if quick else ()) + without
    pre = load_config(pre_file, pre_over)
    if pre.train.train_iters is None:
        raise ValueError(f"{pre_file}: the demo needs train.train_iters (it names the base checkpoint)")
    if not pre.train.export_hf or pre.data.eval is None or pre.eval.domain is None:
        raise ValueError(f"{pre_file}: the demo evaluates the base like the other runs: it needs train.export_hf, "
                         f"data.eval and eval.domain")
    base = pre.run_dir / layout_of_run.CHECKPOINTS / layout_of_run.checkpoint_name(pre.train.train_iters) / "model"
    post_over = common + [f"model.mcore_checkpoint={base}"] + list(QUICK_POSTTRAIN if quick else ()) + without
    runs = []  # (step suffix, config path, overrides, config) of every comparison run, seed by seed
    for m in methods:
        path = config_dir / f"{m}.yaml"
        first = load_config(path, post_over)  # the first seed's run is the config's own
        runs.append((m, path, post_over, first))
        for s in range(first.run.seed + 1, first.run.seed + seeds):
            over = post_over + [f"run.seed={s}", f"run.out_dir={out / 'runs' / f'seed{s}'}"]
            runs.append((f"{m}-seed{s}", path, over, load_config(path, over)))

    tokenizer = pre.input_path(pre.data.tokenizer)
    if tokenizer.name != TOKENIZER_FILE:
        raise ValueError(f"{pre_file}: data.tokenizer must be <demo data dir>/{TOKENIZER_FILE}, got {tokenizer}")
    data_dir, mix_dir = tokenizer.parent, out / "data_pretrain_domain"

    def make_data(name: str, where: Path, sizes: DemoDataConfig) -> Step:
        return Step(name, ("make-demo-data", "--out", str(where), *data_args(sizes)), outputs=(where,),
                    complete=lambda: (where / "manifest.json").is_file() and (where / TOKENIZER_FILE).is_file())

    steps = [make_data("data", data_dir, DemoDataConfig.quick() if quick else DemoDataConfig()),
             make_data("data-pretrain-domain", mix_dir, QUICK_PRETRAIN_DOMAIN if quick else PRETRAIN_DOMAIN)]
    stores: dict[Path, str] = {}  # token store dir -> its preprocess step

    def preprocess(cfg, raw: list[Path], store: str | None) -> list[str]:
        if not raw or store is None:
            return []
        dst = cfg.input_path(store)
        if dst not in stores:
            stores[dst] = f"preprocess-{dst.name}"
            steps.append(Step(stores[dst], ("preprocess", *(a for p in raw for a in ("--input", str(p))),
                                            "--tokenizer", str(tokenizer), "--out", str(dst), "--overwrite",
                                            "--seq-length", str(cfg.data.seq_length), *preprocess_options(cfg),
                                            "--no-progress"),
                              outputs=(dst,), complete=lambda: (dst / "meta.json").is_file(),
                              after=("data", "data-pretrain-domain")))
        return [stores[dst]]

    def preprocess_options(cfg) -> tuple[str, ...]:
        p = cfg.preprocess
        thinking = () if p.enable_thinking is None else ("--enable-thinking" if p.enable_thinking else
                                                         "--no-enable-thinking",)
        return ("--format", p.format, *(a for m in p.map for a in ("--map", m)), "--loss-on", p.loss_on,
                *thinking, "--truncation", p.truncation)

    def inputs(cfg, extra: tuple[Path, ...] = ()) -> tuple[str, ...]:
        train = [cfg.input_path(cfg.preprocess.train_input), *extra] if cfg.preprocess.train_input else []
        evals = [cfg.input_path(cfg.preprocess.eval_input)] if cfg.preprocess.eval_input else []
        return ("data", *preprocess(cfg, train, cfg.data.train), *preprocess(cfg, evals, cfg.data.eval))

    steps.append(Step(PRETRAIN, ("train", str(pre_file), *pre_over), outputs=(pre.run_dir,),
                      complete=lambda: _run_complete(pre) and base.is_dir(),
                      ranks=_ranks(pre), after=inputs(pre, (mix_dir / "domain_train.jsonl",)),
                      config_content=_resolved(pre)))
    # The base's eval, with the comparison runs' eval settings: its column in the report.
    base_eval = pre.run_dir / layout_of_run.EVAL
    base_eval_over = pre_over + list(QUICK_EVAL if quick else ()) + without
    steps.append(Step(f"eval-{PRETRAIN}", ("eval", str(pre_file), *base_eval_over), outputs=(base_eval,),
                      complete=base_eval.is_file, ranks=_ranks(pre), after=(PRETRAIN,),
                      config_content=_resolved(load_config(pre_file, base_eval_over))))

    collects: dict[Path, str] = {}  # replay store dir -> its collect step
    for name, path, over, cfg in runs:
        after = (PRETRAIN, *inputs(cfg))
        if cfg.train.loss == "replay":
            store = cfg.input_path(cfg.collect.store_dir)
            if cfg.input_path(cfg.train.replay_store) != store:
                raise ValueError(f"{path}: train.replay_store must be the store the demo collects "
                                 f"(collect.store_dir {store}), got {cfg.input_path(cfg.train.replay_store)}")
            if store not in collects:  # collected once (by a first seed's run): every seed replays it
                collects[store] = f"collect-{store.name}"
                steps.append(Step(collects[store], ("collect", str(path), *over), outputs=(store,),
                                  complete=lambda store=store: (store / "manifest.json").is_file(),
                                  ranks=_ranks(cfg), after=after, config_content=collect_step_inputs(cfg)))
            after = (*after, collects[store])
        steps.append(Step(f"train-{name}", ("train", str(path), *over), outputs=(cfg.run_dir,),
                          complete=lambda cfg=cfg: _run_complete(cfg), ranks=_ranks(cfg), after=after,
                          config_content=_resolved(cfg)))
    for name, path, over, cfg in runs:
        eval_json = cfg.run_dir / layout_of_run.EVAL
        steps.append(Step(f"eval-{name}", ("eval", str(path), *over), outputs=(eval_json,),
                          complete=eval_json.is_file, ranks=_ranks(cfg), after=(f"train-{name}",),
                          config_content=_resolved(cfg)))
    report = report_dir(out)
    steps.append(Step("report", ("report", "--base", str(pre.run_dir), *(str(cfg.run_dir) for *_, cfg in runs),
                                 "--out", str(report)),
                      outputs=(report,), complete=lambda: (report / "report.md").is_file(),
                      after=(f"eval-{PRETRAIN}", *(f"eval-{name}" for name, *_ in runs))))
    return steps


def report_dir(out: Path) -> Path:
    """Where the demo's report goes."""
    return out / "report"
