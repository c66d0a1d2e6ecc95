import os

import pytest
import torch

from replay_megatron.platform.spawn import RankFailed, run_local


def report(tag):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), os.environ.get("SPAWN_TEST_VAR"), t  # a tensor survives the child's exit


def fail_on_rank_one():
    if os.environ["RANK"] == "1":
        raise ValueError("boom on purpose")
    return 0


@pytest.mark.multiproc
def test_run_local_returns_tensors_in_rank_order_with_env():
    results = run_local(report, 2, "x", env={"SPAWN_TEST_VAR": "set"})
    assert [(r, v) for r, v, _ in results] == [(0, "set"), (1, "set")]
    assert all(torch.equal(t, torch.tensor([3.0])) for _, _, t in results)
    assert "SPAWN_TEST_VAR" not in os.environ


@pytest.mark.multiproc
def test_run_local_names_the_failing_rank():
    with pytest.raises(RankFailed, match="rank 1 failed(.|\n)*boom on purpose"):
        run_local(fail_on_rank_one, 2, timeout=60)
