"""Every config in configs/paper and configs/ablations trains: 2 optimizer steps of `train` on the tiny
Qwen3 at TP1, its model, data and parallel sections rewritten to the tiny shape (optimizer, loss, dtype
and collect settings as the config has them). One spawned single-rank job runs them all, Stage 0 once
per distinct collect section.
"""
from __future__ import annotations

from pathlib import Path


from replay_megatron.config import load_config
from replay_megatron.platform.spawn import run_local
from train_fixtures import SEQ, write_token_store

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PATHS = sorted([*(CONFIGS / "paper").rglob("*.yaml"), *(CONFIGS / "ablations").rglob("*.yaml")])


def tiny(root: Path, name: str, store: str = "store") -> list[str]:
    """Overrides that put a paper/ablation config on the tiny model, its data and one CPU rank."""
    return [f"run.data_root={root}", f"run.out_dir={root / 'runs'}", f"run.name={name}", "platform.device=cpu",
            "model.preset=qwen3-tiny", "model.mcore_checkpoint=",
            "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
            "parallel.sequence_parallel=false", "parallel.distributed_optimizer=false",
            "data.train=tokens", "data.eval=", "data.tokenizer=", f"data.seq_length={SEQ}",
            f"collect.store_dir={store}", "collect.micro_batch_size=2", "collect.k_max=16",
            f"train.replay_store={store}", "train.train_iters=2", "train.epochs=", "train.global_batch_size=2",
            "train.micro_batch_size=1", "train.save_interval=", "train.eval_interval=", "train.export_hf=false",
            "logging.tensorboard=false", "logging.progress_bar=false"]


def _train_all(root: str, paths: list[str]) -> dict[str, object]:
    """2 steps of every config (Stage 0 first, once per distinct collect section); returns per config its
    steps and final loss, or the error."""
    from replay_megatron.platform.distributed import shutdown
    from replay_megatron.runs.collect import collect
    from replay_megatron.runs.train import train

    stores: dict[str, str] = {}
    out: dict[str, object] = {}
    for i, path in enumerate(paths):
        try:
            collect_section = load_config(path, tiny(Path(root), "probe")).collect.model_dump_json()
            store = stores.setdefault(collect_section, f"store{len(stores)}")
            cfg = load_config(path, tiny(Path(root), f"run{i}", store))
            if cfg.train.loss == "replay" and not (Path(root) / store).exists():
                collect(cfg, world_size=1, progress=False)
                shutdown()
            summary = train(cfg, world_size=1, progress=False)
            out[path] = (summary["steps"], summary["final_loss"])
        except Exception as e:  # noqa: BLE001 - reported per config by the test
            out[path] = f"{type(e).__name__}: {e}"
        finally:
            shutdown()
    return out


def test_every_paper_and_ablation_config_trains_two_steps(tmp_path):
    write_token_store(tmp_path / "tokens", 4, seed=0)
    [results] = run_local(_train_all, 1, str(tmp_path), [str(p) for p in PATHS])
    failed = {Path(p).relative_to(CONFIGS).as_posix(): r for p, r in results.items() if not isinstance(r, tuple)}
    assert failed == {}
    assert sorted(results) == [str(p) for p in PATHS]
    assert {load_config(p).optimizer.name for p in PATHS} >= {"adamuon", "muonclip", "mofo", "tam"}
    for path, (steps, loss) in results.items():
        assert steps == 2 and loss == loss, (path, loss)
