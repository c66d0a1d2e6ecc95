"""Held-out perplexity during training: every `train.eval_interval` steps and once at the end of the run."""
from __future__ import annotations

import torch

from replay_megatron.data.token_store import TokenDataset
from replay_megatron.evaluation.perplexity import configured_perplexity
from replay_megatron.training.metrics import MetricsLogger


class PeriodicEval:
    """Owns the eval cadence of a run; does nothing when the config has no `data.eval`."""

    def __init__(self, cfg, layout, vocab_size: int) -> None:
        self.cfg, self.layout, self.vocab_size = cfg, layout, vocab_size
        self.interval = cfg.train.eval_interval
        self.dataset = TokenDataset(cfg.input_path(cfg.data.eval)) if cfg.data.eval is not None else None

    def should_eval(self, step: int) -> bool:
        return self.dataset is not None and bool(self.interval) and step % self.interval == 0

    def should_eval_at_end(self, step: int) -> bool:
        """At the end of a completed run, unless its last step was just evaluated."""
        return self.dataset is not None and not self.should_eval(step)

    def run(self, model, step: int, logger: MetricsLogger) -> None:
        model.eval()
        with torch.no_grad():
            result = configured_perplexity(model.module, self.dataset, self.cfg, self.layout, self.vocab_size)
        model.train()
        logger.log({"step": step, **result}, eval_record=True)
