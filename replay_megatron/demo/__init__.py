"""The embedded CPU demo (issue 7): generated data (general tasks, NL2SQL over SQLite), its metric, its runner.

- `general_tasks`, `nl2sql`: the sample generators; `generate`: the data set on disk and its tokenizer.
- `execution`: NL2SQL execution accuracy (SPEC.md section 5).
- `pipeline`: the demo's steps (`replay-megatron demo`); `runner`: runs them as CLI subprocesses, reusing
  finished ones.
"""
