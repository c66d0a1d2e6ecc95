"""`tools/accelerator_check.py --device cpu`: the one-command accelerator check runs in CI on CPU (small
shapes, the device guard on), so it cannot rot between the runs on real accelerators."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[1] / "tools" / "accelerator_check.py"


@pytest.mark.multiproc
def test_accelerator_check_passes_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(CHECK), "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = done.stdout
    assert done.returncode == 0, f"{out[-6000:]}\n{done.stderr[-4000:]}"
    steps = re.findall(r"^(PASS|FAIL) (\S+)", out, flags=re.M)
    assert [name for _, name in steps] == ["hf-model", "convert", "verify-conversion", "collect", "train-replay",
                                           "train-sft", "eval", "hf-export", "bench-restricted-ce",
                                           "bench-optimizer", "bench-stage0", "bench-stage1"]
    assert all(status == "PASS" for status, _ in steps)
    ratios = re.findall(r"^(restricted CE|MoClip step|Stage 0|Stage 1 step).*\s(\d+\.\d+)x$", out, flags=re.M)
    assert len(ratios) == 10 and all(float(value) > 0 for _, value in ratios), ratios
    assert "12 passed, 0 failed" in out
