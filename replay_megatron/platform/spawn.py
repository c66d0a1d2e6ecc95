"""Run a function on N local processes joined in a torch.distributed group (tests, parity tools, demo).

Each child gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the
function under test goes through the same initialisation path as a `torchrun` launch. Results come back
in rank order; a failure in any rank is re-raised in the parent with that rank's traceback.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from replay_megatron.platform.dependency_warnings import pythonwarnings_for_children
from replay_megatron.platform.launch_env import free_port


class RankFailed(RuntimeError):
    """A spawned rank raised; the message holds its rank and traceback."""


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # Started from a torchrun worker, the child would inherit torchrun's agent
    # store setting and wait forever as a client of a store nobody serves on this new port.
    for key in [k for k in os.environ if k.startswith("TORCHELASTIC_")]:
        del os.environ[key]
    try:
        # Plain pickle bytes: torch's queue reducer would share tensors through this process's memory,
        # which is gone once it exits.
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its rank
        queue.put((rank, False, traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0,
              env: dict[str, str] | None = None) -> list[Any]:
    """Run `fn(*args)` on `world_size` spawned processes; return the per-rank results in rank order.

    `fn` must be importable (module level) and its result picklable. `env` is added to each child's
    environment from its start (before `fn`'s module is imported, so e.g. TRITON_INTERPRET takes effect).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, queue), daemon=False)
             for r in range(world_size)]
    # spawned children inherit os.environ
    with _environment({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": pythonwarnings_for_children(), **(env or {})}):
        for p in procs:
            p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(value)
            else:
                failures.append(f"rank {rank} failed:\n{value}")
                break  # peers may now hang in a collective; stop waiting for them
    except Exception as exc:  # queue.Empty on timeout
        failures.append(f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(results))}: {exc!r}")
    finally:
        for p in procs:
            p.join(timeout=5 if failures else 60)
            if p.is_alive():
                p.terminate()
                p.join()
    if failures:
        raise RankFailed("\n".join(failures))
    return [results[r] for r in range(world_size)]
