"""The demo's local lm-evaluation-harness task: multiple choice over the general held-out set.

Each held-out question gets its gold answer and three answers to other questions of the same family
(arithmetic, strings, look-ups, lists) as choices; lm-eval scores the choice the model finds most likely
after the chat-templated prompt (`acc`, and `acc_norm` per byte). No hub is needed: the task's
`custom_dataset` is a loader module beside the YAML that reads the JSONL beside itself (lm-eval would
resolve a `data_files` path from the working directory), so the files do not depend on where they are.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from replay_megatron.atomic_io import atomic_write_text

TASK_DIR = "lm_eval"
TASK_NAME = "demo_general_mc"
CHOICES = 4


def multiple_choice_docs(samples: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """{"prompt", "choices", "label"} per sample whose family offers CHOICES - 1 other distinct answers."""
    rng = random.Random(f"{seed}-lm-eval-mc")
    by_family: dict[str, list[str]] = {}
    for s in samples:
        by_family.setdefault(s["family"], []).append(s["response"])
    docs = []
    for s in samples:
        others = sorted({r for r in by_family[s["family"]] if r != s["response"]})
        if len(others) < CHOICES - 1:
            continue
        choices = rng.sample(others, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, s["response"])
        docs.append({"prompt": s["prompt"], "choices": choices, "label": label})
    return docs


LOADER = f'''"""Loads {TASK_NAME}.jsonl from beside this file (lm-eval's `custom_dataset` for {TASK_NAME}.yaml)."""
from pathlib import Path


def load(**_):
    import datasets

    return datasets.load_dataset("json", data_files={{"test": str(Path(__file__).with_name("{TASK_NAME}.jsonl"))}})
'''


def task_yaml() -> str:
    """lm-eval's task config: the dataset from the loader module beside it (`LOADER`)."""
    return "\n".join([
        f"task: {TASK_NAME}",
        "dataset_path: json",
        f"custom_dataset: !function {TASK_NAME}.load",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{prompt}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{label}}"',
        'target_delimiter: ""',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "metadata: {version: 1.0}",
        ""])


def write_task(data_dir: Path, heldout: Sequence[dict[str, Any]], seed: int) -> Path:
    """Write `<data_dir>/lm_eval/` (the JSONL, its loader module and the task YAML); returns the JSONL's path."""
    task_dir = data_dir / TASK_DIR
    data_file = task_dir / f"{TASK_NAME}.jsonl"
    atomic_write_text(data_file, "".join(json.dumps(d, ensure_ascii=False) + "\n"
                                         for d in multiple_choice_docs(heldout, seed)))
    atomic_write_text(task_dir / f"{TASK_NAME}.py", LOADER)
    atomic_write_text(task_dir / f"{TASK_NAME}.yaml", task_yaml())
    return data_file
