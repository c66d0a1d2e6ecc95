"""Complete Hugging Face exports of megatron-core checkpoints: `<run_dir>/hf` (train.export_hf) and
`convert megatron-to-hf`.

The directory holds everything `transformers` (and so lm-eval and vLLM) needs: `config.json` (with the
tokenizer's bos/eos/pad ids), the weights as safetensors shards streamed one tensor at a time
(models/hf_export.py: peak memory about the largest tensor, no time limit), the tokenizer with its chat
template (data/tokenizer_export.py) and `generation_config.json` (the source's, else the tokenizer's ids).
It is written into a temporary sibling directory and renamed into place, so a reader sees the old export
or the whole new one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from replay_megatron.atomic_io import atomic_write_json
from replay_megatron.models.safetensors_stream import DEFAULT_SHARD_BYTES

GENERATION_CONFIG = "generation_config.json"


def _complete_configs(out: Path, hf: dict[str, Any], ids: dict[str, int], source: Path | None) -> None:
    """config.json with the tokenizer's token ids; generation_config.json from the source dir, else the ids."""
    atomic_write_json(out / "config.json", {**hf, **ids})
    generation = {}
    if source is not None and source.is_dir() and (source / GENERATION_CONFIG).is_file():
        generation = json.loads((source / GENERATION_CONFIG).read_text())
    atomic_write_json(out / GENERATION_CONFIG, {**ids, **generation})


def export_hf(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str | os.PathLike | None,
              *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Path:
    """Write the complete HF export of the checkpoint `mcore_dir` to `out_dir` (replaced whole); `tokenizer`
    is the sentencepiece file or HF directory the model was trained with (None: weights and config only)."""
    from replay_megatron.data.tokenizer_export import export_tokenizer
    from replay_megatron.models.checkpoint import META_FILE, read_megatron_meta
    from replay_megatron.models.hf_export import export_weights
    from replay_megatron.models.qwen3 import check_qwen3

    hf = read_megatron_meta(mcore_dir)["hf_config"]
    check_qwen3(hf, source=str(Path(mcore_dir) / META_FILE))
    out = Path(out_dir)
    tmp, old = out.with_name(f".{out.name}.tmp-{os.getpid()}"), out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        source = Path(tokenizer) if tokenizer is not None else None
        ids = export_tokenizer(source, tmp) if source is not None else {}
        export_weights(mcore_dir, tmp, hf, max_shard_bytes=max_shard_bytes, progress=progress)
        _complete_configs(tmp, dict(hf), ids, source)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def run_tokenizer(cfg) -> Path | None:
    """The tokenizer a run was trained with: data.tokenizer, else model.hf_path when it holds one."""
    from replay_megatron.data.tokenizer import HF_TOKENIZER_FILES

    if cfg.data.tokenizer is not None:
        return cfg.input_path(cfg.data.tokenizer)
    hf_path = cfg.input_path(cfg.model.hf_path)
    if hf_path is not None and any((hf_path / name).is_file() for name in HF_TOKENIZER_FILES):
        return hf_path
    return None


def export_run_to_hf(cfg, progress: bool = True) -> Path:
    """`<run_dir>/hf` from the run's latest checkpoint and its tokenizer (`run_tokenizer`)."""
    from replay_megatron import run_dir as layout_of_run

    return export_hf(layout_of_run.checkpoint_model_dir(cfg.run_dir), cfg.run_dir / layout_of_run.HF_EXPORT,
                     run_tokenizer(cfg), progress=progress)
