"""Run a chain of `replay-megatron` subcommands as subprocesses, reusing what a previous invocation finished.

Each `Step` is one real CLI run (`python -m replay_megatron CMD ...`, or under
`python -m torch.distributed.run --standalone` for several ranks). A step is skipped when the ledger
(`<out>/demo_state.json`) records that it finished with the same key and its outputs are complete. The
key hashes the command, the content of the step's config (with its overrides) and the keys of the steps
it reads from and when they finished, so an edited config or a re-run upstream step (its outputs were
incomplete) re-runs it and everything after it. A
step that started with the same key but did not finish is run again over its outputs (train and collect
resume); a step whose key changed first has its outputs removed.

Progress goes to stdout: one line when a step starts and ends (name, elapsed), the child's own lines in
between (indented, with the step's elapsed seconds; Python warnings left out), and the child's whole output
in `<out>/logs/<step>.log`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from replay_megatron.atomic_io import atomic_write_json

LEDGER = "demo_state.json"
LOGS = "logs"
_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")  # `file:line: Category: message`, then the source line


class DemoError(RuntimeError):
    """A step failed or cannot run: names the step (and its exit code and log)."""


@dataclass(frozen=True)
class Step:
    """One subcommand run: `command` is what follows `replay-megatron`."""

    name: str
    command: tuple[str, ...]
    outputs: tuple[Path, ...]  # removed before a run under a new key
    complete: Callable[[], bool]  # are the outputs there and whole?
    ranks: int = 1
    after: tuple[str, ...] = ()  # steps whose outputs this one reads
    config_content: str = ""  # the resolved config the command runs (any change re-runs the step)


def launch_argv(step: Step) -> list[str]:
    """The process to start: the CLI in this interpreter, under torchrun when the step has several ranks."""
    cli = ["-m", "replay_megatron", *step.command]
    if step.ranks == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(step.ranks), *cli]


def _child_env(step: Step) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // step.ranks)))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Runner:
    """Runs steps in order under `out_dir`, printing progress to `stream`."""

    def __init__(self, out_dir: Path, stream: TextIO = sys.stdout):
        self.out_dir = out_dir.resolve()
        self.stream = stream
        self.ledger_path = self.out_dir / LEDGER
        self.ledger: dict[str, dict] = {}
        if self.ledger_path.is_file():
            try:
                self.ledger = json.loads(self.ledger_path.read_text())
            except ValueError as e:
                raise DemoError(f"{self.ledger_path}: unreadable ({e}); delete it to re-run every step") from e
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def key(self, step: Step) -> str:
        upstream = {}
        for name in step.after:
            if name not in self.ledger:
                raise DemoError(f"step {step.name} needs step {name}, which has not run")
            upstream[name] = [self.ledger[name]["key"], self.ledger[name].get("finished")]
        blob = json.dumps({"command": step.command, "ranks": step.ranks, "config": step.config_content,
                           "after": upstream}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def run(self, step: Step, index: int, total: int) -> float:
        """Run `step` unless its finished outputs are reusable; returns the seconds it took (0 when reused)."""
        tag = f"[{index}/{total}] {step.name}"
        key = self.key(step)
        entry = self.ledger.get(step.name, {})
        if entry.get("key") == key and entry.get("done") and step.complete():
            self.say(f"{tag}: reused (finished earlier with the same inputs, {entry['seconds']:.1f} s then)")
            return 0.0
        if entry.get("key") != key:
            self._remove_outputs(step)
        self._record(step.name, {"key": key, "done": False})
        argv = launch_argv(step)
        self.say(f"{tag}: replay-megatron {' '.join(step.command)}"
                 + (f"  ({step.ranks} ranks)" if step.ranks > 1 else ""))
        start = time.monotonic()
        log = self.out_dir / LOGS / f"{step.name}.log"
        rc = self._stream(argv, _child_env(step), log)
        seconds = time.monotonic() - start
        if rc != 0:
            raise DemoError(f"step {step.name} failed (exit code {rc}); log: {log}")
        if not step.complete():
            raise DemoError(f"step {step.name} exited 0 but its outputs are incomplete: "
                            + ", ".join(str(p) for p in step.outputs))
        self._record(step.name, {"key": key, "done": True, "seconds": round(seconds, 2), "finished": time.time()})
        self.say(f"{tag}: done in {seconds:.1f} s (demo elapsed {time.monotonic() - self.t0:.1f} s)")
        return seconds

    def _stream(self, argv: list[str], env: dict[str, str], log_path: Path) -> int:
        """Run `argv`, copying its output to the log and (minus warnings) to the stream; its exit code."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(" ".join(argv) + "\n")
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    errors="replace")
            assert proc.stdout is not None
            in_warning = False
            for line in proc.stdout:
                log.write(line)
                in_warning = bool(_WARNING.match(line)) or (in_warning and line[:1].isspace())
                if line.strip() and not in_warning:
                    self.stream.write(f"    {time.monotonic() - start:6.1f}s  {line}")
                    self.stream.flush()
            return proc.wait()

    def _remove_outputs(self, step: Step) -> None:
        for path in step.outputs:
            path = path.resolve()
            if self.out_dir not in path.parents:
                raise DemoError(f"step {step.name}: refusing to remove {path}, which is outside {self.out_dir}")
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def _record(self, name: str, entry: dict) -> None:
        self.ledger[name] = entry
        atomic_write_json(self.ledger_path, self.ledger)
