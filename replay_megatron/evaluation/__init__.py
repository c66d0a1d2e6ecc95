"""Evaluation of a run (SPEC.md section 5): held-out perplexity, relative L2 distance to the base weights,
the domain metric; `run.evaluate_run` is what `replay-megatron eval` runs."""
