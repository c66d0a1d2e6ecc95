"""metrics.jsonl and TensorBoard output of training runs (issue 6 item 6)."""
import json

from replay_megatron import run_dir as layout_of_run
from replay_megatron.training.metrics import MetricsLogger


def test_records_append_as_json_lines_with_nan_as_null(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"step": 1, "loss": 2.5, "grad_norm": 1.0, "skipped": False})
    logger.log({"step": 2, "loss": float("nan"), "grad_norm": float("inf"), "skipped": True})
    logger.log({"step": 2, "eval_loss": 3.0, "perplexity": 20.1}, eval_record=True)
    logger.close()
    lines = (tmp_path / layout_of_run.METRICS).read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 2.5, "grad_norm": 1.0, "skipped": False},
                                              {"step": 2, "loss": None, "grad_norm": None, "skipped": True}]
    assert list(layout_of_run.read_jsonl(tmp_path / layout_of_run.EVAL_METRICS)) == [
        {"step": 2, "eval_loss": 3.0, "perplexity": 20.1}]


def test_a_resumed_run_drops_lines_past_its_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        logger.log({"step": step, "loss": float(step)})
        logger.log({"step": step, "perplexity": float(step)}, eval_record=True)
    MetricsLogger(tmp_path, tensorboard=False, resume_step=3).log({"step": 4, "loss": 40.0})
    assert [r["loss"] for r in layout_of_run.read_jsonl(tmp_path / layout_of_run.METRICS)] == [1.0, 2.0, 3.0, 40.0]
    assert [r["step"] for r in layout_of_run.read_jsonl(tmp_path / layout_of_run.EVAL_METRICS)] == [1, 2, 3]


def test_tensorboard_events_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, jsonl=False)
    for step in (1, 2):
        logger.log({"step": step, "loss": 1.0 / step, "skipped": False})
    logger.close()
    events = EventAccumulator(str(tmp_path / layout_of_run.TENSORBOARD))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5)]
    assert "train/skipped" not in events.Tags()["scalars"]  # booleans are not plotted
    assert not (tmp_path / layout_of_run.METRICS).exists()
