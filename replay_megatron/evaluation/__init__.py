"""Metrics of SPEC.md section 5: held-out perplexity, relative L2 distance to the base weights, the domain
metric (NL2SQL execution accuracy) and the stability metrics of a loss curve; `runs.evaluate` runs them."""
