"""One command that proves the product on one accelerator: the whole pipeline, then the benchmarks.

Pipeline, on a tiny random Qwen3 and random token stores it makes itself, each step a real
`replay-megatron` command in its own process on --device:

  hf-model           a transformers Qwen3ForCausalLM saved as safetensors (the user's starting point)
  convert            HF -> megatron-core distributed checkpoint
  verify-conversion  Megatron logits == transformers logits
  collect            Stage 0: dynamic Top-K store from the converted checkpoint
  train-replay       Stage 1: restricted CE + MoClip (the Triton kernels where triton imports), HF export
  train-sft          full-vocabulary CE + AdamW
  eval               perplexity change and relative L2 of the replay run
  hf-export          transformers loads the replay run's export; its logits == the final checkpoint's

Benchmarks (accelerator shapes by default, small ones on CPU), each in the same run as its baseline:
restricted CE (Triton kernel, PyTorch op, megatron-core's vocab_parallel_cross_entropy on full logits; fp32
and bf16), MoClip's step vs torch.optim.AdamW(fused=True), Stage 0 collection vs a forward pass, and a
Stage 1 step (replay + MoClip) vs an AdamW SFT step of Qwen3-0.6B at sequence length 4096.

Prints a PASS/FAIL line per step and one table of ratios; exits 1 if any step failed. On CPU the pipeline
runs with the device guard on (`platform.device_guard`), so the CPU plays an accelerator.

    python tools/accelerator_check.py [--device auto|cuda|npu|cpu] [--out DIR] [--no-bench] [--steps a,b]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import yaml

TOOLS = Path(__file__).resolve().parent
PIPELINE = ("hf-model", "convert", "verify-conversion", "collect", "train-replay", "train-sft", "eval", "hf-export")
BENCHMARKS = ("bench-restricted-ce", "bench-optimizer", "bench-stage0", "bench-stage1")
SEQ = 32


class Check:
    """The work dir, the device and the results of the steps run so far."""

    def __init__(self, device: str, out: Path, step_timeout: float, params_dtype: str) -> None:
        self.device, self.out, self.step_timeout = device, out, step_timeout
        self.params_dtype = ("bf16" if device != "cpu" else "fp32") if params_dtype == "auto" else params_dtype
        self.results: list[tuple[str, bool, str, float]] = []
        self.ratios: list[tuple[str, str]] = []

    @property
    def accelerator(self) -> bool:
        return self.device != "cpu"

    def cli(self, *args: str) -> str:
        """Run `replay-megatron ARGS` in a fresh process in the work dir; returns stdout, raises on failure."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if not self.accelerator:
            env.update({"REPLAY_MEGATRON_DEVICE_GUARD": "1", "OMP_NUM_THREADS": "1"})
        done = subprocess.run([sys.executable, "-m", "replay_megatron", *args], cwd=self.out, env=env,
                              capture_output=True, text=True, timeout=self.step_timeout)
        log = self.out / "logs" / f"{args[0]}-{len(list((self.out / 'logs').glob('*')))}.log"
        log.write_text(f"$ replay-megatron {' '.join(args)}\n{done.stdout}\n{done.stderr}")
        if done.returncode:
            raise RuntimeError(f"`replay-megatron {' '.join(args)}` exited {done.returncode} (log {log}):\n"
                               f"{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def run(self, name: str, fn: Callable[[], str]) -> None:
        """Run one step, print its PASS/FAIL line; a failure is recorded, never raised."""
        start = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as e:  # noqa: BLE001 - every step reports; the check goes on
            detail, ok = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}", False
        elapsed = time.perf_counter() - start
        self.results.append((name, ok, detail, elapsed))
        first = detail.strip().splitlines()[0] if detail.strip() else ""
        print(f"{'PASS' if ok else 'FAIL'} {name:22s} {elapsed:7.1f} s  {first}", flush=True)
        if not ok:
            print("    " + detail.replace("\n", "\n    "), flush=True)


# --- the pipeline -------------------------------------------------------------------------------------------

def _config(check: Check) -> Path:
    """Random token stores and the run config every pipeline command reads."""
    from replay_megatron.data.synthetic import write_random_token_store
    from replay_megatron.models.presets import preset

    vocab = preset("qwen3-tiny")["vocab_size"]
    for name, n, seed in (("tokens", 16, 0), ("heldout", 8, 1)):
        write_random_token_store(check.out / name, n, seed=seed, seq_length=SEQ, vocab_size=vocab)
    body = {"run": {"name": "replay", "data_root": str(check.out), "out_dir": str(check.out / "runs"), "seed": 7},
            "platform": {"device": check.device},
            "model": {"hf_path": "hf_base", "mcore_checkpoint": "mcore_base",
                      "params_dtype": check.params_dtype},
            "data": {"train": "tokens", "eval": "heldout", "seq_length": SEQ},
            "collect": {"tau": 0.9, "k_max": 16, "micro_batch_size": 4, "store_dir": "store",
                        "positions": {"strategy": "bucket", "amount": 0.5, "buckets": 2}},
            "train": {"loss": "replay", "global_batch_size": 8, "micro_batch_size": 2, "train_iters": 6,
                      "epochs": None, "save_interval": 3, "eval_interval": 3, "export_hf": True},
            "optimizer": {"name": "moclip", "lr": 1e-3, "weight_decay": 0.01},
            "eval": {"micro_batch_size": 4},
            "logging": {"progress_bar": False, "tensorboard": False}}
    path = check.out / "check.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _hf_model(check: Check) -> str:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from replay_megatron.models.presets import preset

    torch.manual_seed(0)
    config = Qwen3Config(**{**preset("qwen3-tiny"), "initializer_range": 0.2})
    Qwen3ForCausalLM(config).float().save_pretrained(check.out / "hf_base", safe_serialization=True)
    _config(check)
    return f"tiny Qwen3 ({sum(1 for _ in (check.out / 'hf_base').iterdir())} files) + token stores in {check.out}"


def _verify(check: Check, hf: str, mcore: str, tol: float) -> str:
    out = check.cli("verify-conversion", "--hf", hf, "--mcore", mcore, "--device", check.device,
                    "--tol", str(tol))
    return next(line for line in out.splitlines() if "max" in line.lower())


def _metrics(check: Check, run: str) -> list[dict]:
    lines = (check.out / "runs" / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _train(check: Check, run: str, *overrides: str) -> str:
    check.cli("train", "check.yaml", f"run.name={run}", *overrides)
    metrics = _metrics(check, run)
    losses = [m["loss"] for m in metrics]
    if len(losses) != 6 or not all(isinstance(x, float) and x == x for x in losses):
        raise RuntimeError(f"{run}: expected 6 finite losses, got {losses}")
    peak = max(m["peak_memory_bytes"] for m in metrics) / 2**20
    extra = f", clip rate {metrics[-1]['clip_rate']:.2f}" if "clip_rate" in metrics[-1] else ""
    return f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, {metrics[-1]['step_time_s']:.3f} s/step, peak {peak:.0f} MiB{extra}"


def _eval(check: Check) -> str:
    check.cli("eval", "check.yaml", "run.name=replay")
    result = json.loads((check.out / "runs" / "replay" / "eval.json").read_text())
    ppl, l2 = result["finetuned"]["perplexity"], result["relative_l2"]
    if not (ppl == ppl and 0 < l2 < 1):
        raise RuntimeError(f"eval.json: perplexity {ppl}, relative L2 {l2}")
    return f"perplexity {result['base']['perplexity']:.2f} -> {ppl:.2f}, relative L2 {l2:.3e}"


def _hf_export(check: Check) -> str:
    run = check.out / "runs" / "replay"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    # the export and the checkpoint hold the same (bf16 or fp32) weights, compared in fp32
    return _verify(check, str(run / "hf"), str(run / "checkpoints" / latest / "model"),
                   tol=2e-3 if check.accelerator else 1e-4)


def pipeline_steps(check: Check) -> dict[str, Callable[[], str]]:
    tol = 2e-3 if check.accelerator else 1e-4  # GPU fp32 matmuls vs transformers on the host
    return {
        "hf-model": lambda: _hf_model(check),
        "convert": lambda: check.cli("convert", "hf-to-megatron", "--hf", "hf_base", "--out", "mcore_base",
                                     "--device", check.device).strip().splitlines()[-1],
        "verify-conversion": lambda: _verify(check, "hf_base", "mcore_base", tol),
        "collect": lambda: check.cli("collect", "check.yaml", "--no-progress").strip().splitlines()[0],
        "train-replay": lambda: _train(check, "replay"),
        "train-sft": lambda: _train(check, "sft", "train.loss=full", "optimizer.name=adamw", "train.export_hf=false"),
        "eval": lambda: _eval(check),
        "hf-export": lambda: _hf_export(check),
    }


# --- benchmarks ---------------------------------------------------------------------------------------------

def _tool(name: str) -> Any:
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


def _bench_restricted_ce(check: Check) -> str:
    shape = ["--n", "8192"] if check.accelerator else ["--quick", "--repeats", "1"]
    variants = ["op", "kernel", "full_vocab"] if check.accelerator else ["op", "full_vocab"]
    lines = []
    for dtype in ("float32", "bfloat16"):
        r = _tool("bench_restricted_ce").main(["--device", check.device, "--dtype", dtype, *shape,
                                               "--variants", *variants])
        base = r["full_vocab"]
        for name in variants[:-1]:
            check.ratios.append((f"restricted CE {dtype}: full-vocab / {name} time",
                                 f"{base['wall_s'] / r[name]['wall_s']:.1f}x"))
            check.ratios.append((f"restricted CE {dtype}: full-vocab / {name} peak memory",
                                 f"{base['peak_mib'] / max(r[name]['peak_mib'], 1e-9):.1f}x"))
        lines.append(f"{dtype}: " + ", ".join(f"{n} {r[n]['wall_s'] * 1e3:.1f} ms" for n in variants))
    lines.append(_fused_linear_ce_note())
    return "; ".join(lines)


def _fused_linear_ce_note() -> str:
    found = [m for m in ("liger_kernel", "cut_cross_entropy") if importlib.util.find_spec(m) is not None]
    return f"fused linear CE libraries importable: {found or 'none (Liger, CCE not installed)'}"


def _bench_optimizer(check: Check) -> str:
    import torch

    if check.accelerator:
        args = ["--params", "1e9", "--hidden", "2048", "--ffn", "6144", "--vocab", "151936", "--reps", "5",
                "--optimizers", "AdamW(fused),MoClip(fused)"]
        moclip = "MoClip(fused)"
    else:
        args = ["--params", "2e6", "--hidden", "128", "--ffn", "256", "--vocab", "1000", "--reps", "2",
                "--optimizers", "AdamW(fused),MoClip(per-tensor)"]
        moclip = "MoClip(per-tensor)"
    r = _tool("bench_optimizer").main([*args, "--device", check.device])
    for scenario, rows in r.items():
        check.ratios.append((f"MoClip step / AdamW(fused) step, {scenario}",
                             f"{rows[moclip]['median'] / rows['AdamW(fused)']['median']:.2f}x"))
    if check.device == "cuda":
        torch.cuda.empty_cache()  # the benchmark's 1B parameters are garbage now; the next step needs the room
    return ", ".join(f"{s}: {moclip} {rows[moclip]['median'] * 1e3:.1f} ms, AdamW(fused) "
                     f"{rows['AdamW(fused)']['median'] * 1e3:.1f} ms" for s, rows in r.items())


def _bench_stage0(check: Check) -> str:
    args = (["--hidden", "1024", "--layers", "28", "--seq", "4096", "--micro-batch", "1", "--micro-batches", "4",
             "--repeats", "2"] if check.accelerator else
            ["--vocab", "8192", "--hidden", "64", "--seq", "64", "--micro-batches", "2"])
    rows = _tool("bench_stage0").main(["--device", check.device, *args])
    forward = rows[0]["wall_s"]
    for r in rows[1:]:
        check.ratios.append((f"Stage 0 collect ({r['strategy']}) / forward time", f"{r['wall_s'] / forward:.2f}x"))
    return ", ".join(f"{r['pass']}({r['strategy']}) {r['wall_s']:.3f} s" for r in rows)


def _bench_stage1(check: Check) -> str:
    args = (["--preset", "qwen3-0.6b", "--seq", "4096", "--batch", "1", "--params-dtype", "bf16", "--repeats", "3"]
            if check.accelerator else ["--hidden", "64", "--seq", "32", "--repeats", "1"])
    rows = {r["variant"]: r for r in _tool("bench_stage1_step").main(["--device", check.device, *args])}
    sft, ours = rows["AdamW SFT (full vocabulary)"], rows["replay + MoClip (the paper)"]
    check.ratios.append(("Stage 1 step: AdamW SFT / replay + MoClip time (paper 0.81/0.51 = 1.59x)",
                         f"{sft['median_s'] / ours['median_s']:.2f}x"))
    check.ratios.append(("Stage 1 step: AdamW SFT / replay + MoClip peak memory",
                         f"{sft['peak_mib'] / ours['peak_mib']:.2f}x"))
    return (f"replay + MoClip {ours['median_s']:.3f} s ({ours['tokens_per_s']:.0f} tok/s, {ours['peak_mib']:.0f} MiB), "
            f"AdamW SFT {sft['median_s']:.3f} s ({sft['tokens_per_s']:.0f} tok/s, {sft['peak_mib']:.0f} MiB)")


def benchmark_steps(check: Check) -> dict[str, Callable[[], str]]:
    return {"bench-restricted-ce": lambda: _bench_restricted_ce(check),
            "bench-optimizer": lambda: _bench_optimizer(check),
            "bench-stage0": lambda: _bench_stage0(check),
            "bench-stage1": lambda: _bench_stage1(check)}


# --- main ---------------------------------------------------------------------------------------------------

def _environment(device: str) -> str:
    import torch

    import megatron.core
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not importable"
    if device == "cuda":
        name = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    elif device == "npu":
        name = torch.npu.get_device_name()  # type: ignore[attr-defined]
    else:
        name = f"CPU, {os.cpu_count()} cores"
    return (f"device {device}: {name}; torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
            f"transformers {transformers.__version__}, triton {triton_version}, Python {sys.version.split()[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"])
    parser.add_argument("--out", default=None, help="work dir (default: a fresh temporary dir)")
    parser.add_argument("--no-bench", action="store_true", help="the pipeline only")
    parser.add_argument("--steps", default=None, help=f"comma-separated subset of {PIPELINE + BENCHMARKS}")
    parser.add_argument("--step-timeout", type=float, default=600, help="seconds per pipeline command")
    parser.add_argument("--params-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="the pipeline's weights (auto: bf16 on accelerators, fp32 on CPU)")
    args = parser.parse_args(argv)
    from replay_megatron.platform.dependency_warnings import silence_dependency_warnings
    from replay_megatron.platform.device import resolve_device

    silence_dependency_warnings()

    device = resolve_device(args.device).type
    out = Path(args.out or tempfile.mkdtemp(prefix="accelerator_check_")).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    check = Check(device, out, args.step_timeout, args.params_dtype)
    print(_environment(device), flush=True)
    steps = {**pipeline_steps(check), **({} if args.no_bench else benchmark_steps(check))}
    wanted = args.steps.split(",") if args.steps else list(steps)
    unknown = sorted(set(wanted) - set(steps))
    if unknown:
        parser.error(f"--steps: unknown {unknown}; choose from {list(steps)}")
    started = time.perf_counter()
    for name in wanted:
        check.run(name, steps[name])
    print(f"\n{'ratio':72s} value")
    for label, value in check.ratios:
        print(f"{label:72s} {value}")
    failed = [name for name, ok, _, _ in check.results if not ok]
    print(f"\n{len(check.results) - len(failed)} passed, {len(failed)} failed in "
          f"{time.perf_counter() - started:.0f} s{': ' + ', '.join(failed) if failed else ''} (work dir {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
