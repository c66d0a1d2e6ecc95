"""The demo's local lm-eval task: every held-out question becomes 4-way multiple choice with its gold
answer at `label` and three other answers of its family; the task loads the JSONL beside it, wherever
the directory is."""
import json
import shutil

from replay_megatron.demo.generate import DemoDataConfig, general_splits
from lm_eval.tasks import TaskManager, get_task_dict

from replay_megatron.demo.lm_eval_task import CHOICES, TASK_NAME, write_task


def test_multiple_choice_docs_hold_the_gold_answer_at_label_among_its_familys(tmp_path):
    heldout = general_splits(DemoDataConfig.quick())["general_heldout"]
    data_file = write_task(tmp_path, heldout, seed=0)
    docs = [json.loads(line) for line in data_file.read_text().splitlines()]
    families = {}
    for sample in heldout:
        families.setdefault(sample["family"], set()).add(sample["response"])
    by_prompt = {s["prompt"]: s for s in heldout}
    assert len(docs) >= len(heldout) - 4
    assert {d["label"] for d in docs} == set(range(CHOICES))  # the gold answer is not always first
    for doc in docs:
        gold = by_prompt[doc["prompt"]]
        assert doc["choices"][doc["label"]] == gold["response"] and len(set(doc["choices"])) == CHOICES
        assert set(doc["choices"]) <= families[gold["family"]]
    moved = shutil.copytree(tmp_path / "lm_eval", tmp_path / "elsewhere")
    data_file.unlink()  # the copy must read its own JSONL
    task = get_task_dict([TASK_NAME], TaskManager(include_path=str(moved), include_defaults=False))[TASK_NAME]
    assert [dict(d) for d in task.test_docs()] == docs
    assert write_task(tmp_path, heldout, seed=0).read_text() == data_file.read_text()  # deterministic
