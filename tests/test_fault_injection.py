"""Faults done for real to `train` and `collect`: flipped and truncated checkpoint bytes, a missing or
unreadable `latest`, a torn metrics line, two runs on one run dir or store, a `kill -9` holding the lock,
edited store manifests, a store collected with other settings, a taken rendezvous port.

Each case ends in a refusal naming the file / key / holder, or in a verified fallback whose results equal
the uninterrupted run's exactly; none may exit 0 with silently different results.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from replay_megatron.config import ConfigError, load_config
from replay_megatron.platform.spawn import run_local
from replay_megatron import run_dir as layout_of_run
from train_fixtures import training_root_with_stores

pytestmark = pytest.mark.mcore_compat

CURVE_KEYS = ("step", "loss", "grad_norm", "cos_phi", "clip_rate", "lr", "consumed_samples")
NO_EVAL = ["data.eval=null"]
ITER3, ITER6 = layout_of_run.checkpoint_name(3), layout_of_run.checkpoint_name(6)


def _curve(run_dir: Path) -> list[tuple]:
    return [tuple(r.get(k) for k in CURVE_KEYS) for r in layout_of_run.read_jsonl(run_dir / layout_of_run.METRICS)]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _run_dir(cfg_path: str, name: str) -> Path:
    return load_config(cfg_path, [f"run.name={name}"]).run_dir


def _damage(config_path: str, name: str, action: str) -> None:
    """File surgery between two `train` calls of `train_sequence_job` (runs in the job's process)."""
    checkpoints = _run_dir(config_path, name) / layout_of_run.CHECKPOINTS
    if action == "flip_model_of_6":
        _flip_byte(checkpoints / ITER6 / "model" / "__0_0.distcp")
    elif action == "truncate_optimizer_of_6_flip_optimizer_of_3":
        _truncate(checkpoints / ITER6 / "optimizer" / "__0_0.distcp")
        _flip_byte(checkpoints / ITER3 / "optimizer" / "__0_0.distcp")
    elif action == "remove_latest":
        (checkpoints / layout_of_run.LATEST).unlink()
    elif action == "latest_is_a_directory_and_6_is_corrupt":
        (checkpoints / layout_of_run.LATEST).unlink()
        (checkpoints / layout_of_run.LATEST).mkdir()
        _flip_byte(checkpoints / ITER6 / "optimizer" / "__0_0.distcp")
    elif action == "torn_metrics_line":
        with open(_run_dir(config_path, name) / layout_of_run.METRICS, "a") as f:
            f.write('{"step": 5, "loss": 1.2')  # what a kill in the middle of an append leaves
    else:
        raise ValueError(action)


def fault_sequence_job(config_path: str, steps: list[tuple[str, str, str | None, dict]]) -> list[dict]:
    """One rank: per (command, run name or store dir, damage before it, kwargs) the damage, then `train` or
    `collect`; returns per step the printed output, the error (if any) and the checkpoint files' mtimes."""
    from replay_megatron.platform.distributed import shutdown
    from replay_megatron.runs.collect import collect
    from replay_megatron.runs.train import train

    out = []
    for command, name, damage, kwargs in steps:
        if damage is not None:
            _damage(config_path, name, damage)
        overrides = [f"run.name={name}", *NO_EVAL] if command == "train" else [f"collect.store_dir={name}"]
        cfg = load_config(config_path, overrides, world_size=1)
        printed, error = io.StringIO(), None
        try:
            with contextlib.redirect_stdout(printed):
                (train if command == "train" else collect)(cfg, world_size=1, progress=False, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - the test asserts on it (torch's CheckpointException included)
            error = f"{type(e).__name__}: {e}"
        finally:
            shutdown()
        out.append({"printed": printed.getvalue(), "error": error,
                    "mtimes": {str(p): p.stat().st_mtime_ns for p in (cfg.run_dir / "checkpoints").rglob("*")}})
    return out


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> str:
    return training_root_with_stores(tmp_path_factory.mktemp("faults"), [])


@pytest.fixture(scope="module")
def sequence(config_path, tmp_path_factory) -> dict[str, dict]:
    """A `train` and a `collect` stopped alive (lock held), a second of each refused, both holders killed -9;
    then in one spawned job: their re-runs, the damaged runs each re-run after its damage, the reference."""
    blocked = tmp_path_factory.mktemp("blocked")
    holders = {"train": _start_blocked(blocked / "train", _BLOCK_TRAIN_AT_STEP_5, _train_call(config_path)),
               "collect": _start_blocked(blocked / "collect", _BLOCK_COLLECT_AFTER_SHARDS, _collect_call(config_path))}
    results: dict[str, dict] = {}
    try:
        for command, holder in holders.items():
            _wait_until_blocked(*holder)
            results[f"{command}_second"] = {"pid": holder[0].pid, "error": _second_run(config_path, command)}
    finally:
        for holder, _ in holders.values():
            _kill9(holder)
    steps = {
        "train_after_kill": ("train", "locked", None, {}),
        "collect_after_kill": ("collect", KILLED_STORE, None, {}),
        "ref": ("train", "ref", None, {}),
        "flip_first": ("train", "flip", None, {}),
        "flip": ("train", "flip", "flip_model_of_6", {}),
        "no_latest": ("train", "flip", "remove_latest", {}),
        "bad_latest": ("train", "flip", "latest_is_a_directory_and_6_is_corrupt", {}),
        "refuse_first": ("train", "refuse", None, {}),
        "refuse": ("train", "refuse", "truncate_optimizer_of_6_flip_optimizer_of_3", {}),
        "torn_first": ("train", "torn", None, {"stop_after_steps": 4}),
        "torn": ("train", "torn", "torn_metrics_line", {}),
    }
    [sequence] = run_local(fault_sequence_job, 1, config_path, list(steps.values()))
    return results | dict(zip(steps, sequence))


@pytest.mark.multiproc
def test_a_flipped_checkpoint_byte_is_named_and_the_previous_checkpoint_resumed_exactly(config_path, sequence):
    got = sequence["flip"]
    assert got["error"] is None
    assert f"{ITER6}/model/__0_0.distcp is corrupt" in got["printed"]
    assert f"resuming from {ITER3}" in got["printed"]
    assert _curve(_run_dir(config_path, "flip")) == _curve(_run_dir(config_path, "ref"))


@pytest.mark.multiproc
def test_without_a_verified_checkpoint_the_resume_is_refused_naming_each_file(config_path, sequence):
    got = sequence["refuse"]
    assert got["error"].startswith("CheckpointCorrupt")
    assert f"{ITER6}/optimizer/__0_0.distcp is truncated" in got["error"]
    assert f"{ITER3}/optimizer/__0_0.distcp is corrupt" in got["error"]
    assert got["mtimes"] == sequence["refuse_first"]["mtimes"] | {  # nothing rewritten but the damaged files
        k: v for k, v in got["mtimes"].items() if k.endswith("optimizer/__0_0.distcp")}


@pytest.mark.multiproc
def test_a_missing_latest_resumes_the_newest_verified_checkpoint_and_overwrites_nothing(config_path, sequence):
    got, before = sequence["no_latest"], sequence["flip"]
    assert got["error"] is None and "latest is missing" in got["printed"]
    assert f"from {ITER6}" in got["printed"]
    assert {k: v for k, v in got["mtimes"].items() if not k.endswith("latest")} == \
        {k: v for k, v in before["mtimes"].items() if not k.endswith("latest")}


@pytest.mark.multiproc
def test_an_unreadable_latest_falls_back_past_a_corrupt_checkpoint(config_path, sequence):
    got = sequence["bad_latest"]
    assert got["error"] is None and "latest is unreadable" in got["printed"]
    assert f"{ITER6}/optimizer/__0_0.distcp is corrupt" in got["printed"] and f"resuming from {ITER3}" in got["printed"]
    assert _curve(_run_dir(config_path, "flip")) == _curve(_run_dir(config_path, "ref"))


@pytest.mark.multiproc
def test_a_torn_last_metrics_line_past_the_checkpoint_is_dropped_and_the_run_resumes_exactly(config_path, sequence):
    got = sequence["torn"]
    assert got["error"] is None and "torn last line" in got["printed"]
    assert _curve(_run_dir(config_path, "torn")) == _curve(_run_dir(config_path, "ref"))


# --- Two runs at once, and a kill -9 of the one holding the lock ------------------------------------------

KILLED_STORE = "store_killed"

_BLOCKED = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from replay_megatron.config import load_config
{patch}
{call}
"""

_BLOCK_TRAIN_AT_STEP_5 = """
from replay_megatron.training import step
original, calls = step.train_step, [0]
def blocked(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 5:  # iter_0000003 is saved by now
        Path({ready!r}).write_text("")
        time.sleep(600)
    return original(*args, **kwargs)
step.train_step = blocked
"""

_BLOCK_COLLECT_AFTER_SHARDS = """
from replay_megatron.replay import store_writer
original = store_writer.ReplayStoreWriter.close
def blocked(self):
    original(self)  # every shard closed; the manifest not yet written
    Path({ready!r}).write_text("")
    time.sleep(600)
store_writer.ReplayStoreWriter.close = blocked
"""

LOCKED_RUN = ["run.name=locked", *NO_EVAL]


def _train_call(config_path: str) -> str:
    return f"from replay_megatron.runs.train import train\ntrain(load_config({config_path!r}, {LOCKED_RUN!r}))"


def _collect_call(config_path: str) -> str:
    override = [f"collect.store_dir={KILLED_STORE}"]
    return f"from replay_megatron.runs.collect import collect\ncollect(load_config({config_path!r}, {override!r}))"


def _start_blocked(ready: Path, patch: str, call: str) -> tuple[subprocess.Popen, Path]:
    """A real `train`/`collect` in its own process that stops (alive, lock held) at the patched moment."""
    script = _BLOCKED.format(tests=str(Path(__file__).parent), patch=patch.format(ready=str(ready)), call=call)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env), ready


def _wait_until_blocked(proc: subprocess.Popen, ready: Path) -> None:
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert proc.poll() is None, "the blocked run died before reaching its stopping point"
        assert time.monotonic() < deadline
        time.sleep(0.2)


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _second_run(config_path: str, command: str) -> str | None:
    """The same command on the holder's directory, here (a refusal comes before any process group or model)."""
    from replay_megatron.platform.distributed import shutdown

    try:
        if command == "train":
            from replay_megatron.runs.train import train

            train(load_config(config_path, LOCKED_RUN, world_size=1), world_size=1, progress=False)
        else:
            from replay_megatron.runs.collect import collect

            collect(load_config(config_path, [f"collect.store_dir={KILLED_STORE}"]), world_size=1, progress=False)
    except Exception as e:  # noqa: BLE001 - the test asserts on it
        return f"{type(e).__name__}: {e}"
    finally:
        shutdown()
    return None


@pytest.mark.multiproc
def test_a_second_train_on_a_run_dir_is_refused_and_a_killed_holder_is_taken_over(config_path, sequence):
    holder = sequence["train_second"]
    assert f"in use by pid {holder['pid']} on host {socket.gethostname()}" in (holder["error"] or "")
    got = sequence["train_after_kill"]  # the holder was killed -9 mid-run, after saving iter_0000003
    assert got["error"] is None and f"taking over the stale lock of pid {holder['pid']}" in got["printed"]
    assert _curve(_run_dir(config_path, "locked")) == _curve(_run_dir(config_path, "ref"))  # one run's lines


@pytest.mark.multiproc
def test_a_second_collect_on_a_store_is_refused_and_a_kill_before_the_manifest_keeps_the_timing(config_path,
                                                                                               sequence):
    from replay_megatron.replay.records import TIMING_RECORD
    from replay_megatron.replay.store import MANIFEST_NAME

    holder = sequence["collect_second"]
    assert f"in use by pid {holder['pid']}" in (holder["error"] or "")
    got = sequence["collect_after_kill"]  # the holder was killed -9 with every shard closed, no manifest yet
    assert got["error"] is None and f"taking over the stale lock of pid {holder['pid']}" in got["printed"]
    store, reference = (Path(load_config(config_path).input_path(name)) for name in (KILLED_STORE, "store"))
    assert json.loads((store / TIMING_RECORD).read_text())["micro_batches"] > 0
    assert (store / MANIFEST_NAME).read_bytes() == (reference / MANIFEST_NAME).read_bytes()


def test_a_taken_rendezvous_port_is_named_and_an_unset_one_is_picked_free():
    from replay_megatron.platform.launch_env import LaunchEnvError, read_launch_env

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LaunchEnvError, match=f"MASTER_PORT={port} is already in use"):
            read_launch_env({"MASTER_PORT": str(port)})
        assert read_launch_env({}).master_port != port


# --- The store bound to the run ------------------------------------------------------------------------

def test_a_store_collected_with_other_settings_is_refused_naming_each_key(config_path):
    from replay_megatron.runs.train import preflight

    with pytest.raises(ConfigError) as refused:
        preflight(load_config(config_path, ["collect.tau=0.5", "collect.k_max=4"]), 1)
    assert [p.key for p in refused.value.causes] == ["collect.tau", "collect.k_max"]
    with pytest.raises(ConfigError, match="collect.positions.strategy"):
        preflight(load_config(config_path, ["collect.positions.strategy=all"]), 1)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["config"]["collect"].update(k_max=8) or m.update(k_max=8), "its k_max is 8, but .*shard.json records 16"),
    (lambda m: m["shards"][0].update(records=1), "shard-00000 records is 1"),
    (lambda m: m["totals"].update(samples=99), "totals.samples is 99"),
])
def test_a_manifest_contradicting_its_shards_is_reported_corrupt(config_path, tmp_path, edit, match):
    from replay_megatron.replay.store import MANIFEST_NAME, ReplayStore, ReplayStoreError

    store = tmp_path / "store"
    shutil.copytree(Path(load_config(config_path).input_path("store")), store)
    manifest = json.loads((store / MANIFEST_NAME).read_text())
    edit(manifest)
    (store / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ReplayStoreError, match=f"{MANIFEST_NAME} is corrupt: .*{match}"):
        ReplayStore.open(store)


def test_a_lock_left_by_a_dead_process_is_taken_over_even_when_a_child_inherited_it(tmp_path, capfd):
    from replay_megatron.platform.writer_lock import LOCK_NAME, WriterLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "command": "train", "started": "earlier"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    inheritor = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(120)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert inheritor.stdout.readline().strip() == "locked"
        lock = WriterLock(tmp_path, "train")
        lock.acquire()
        said = capfd.readouterr().out
        assert f"held by pid {record['pid']}" in said and "which is gone; taking it over" in said
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(Exception, match=f"in use by pid {os.getpid()}"):
            WriterLock(tmp_path, "train").acquire()
        lock.release()
    finally:
        _kill9(inheritor)
