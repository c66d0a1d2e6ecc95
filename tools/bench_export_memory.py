"""Peak host memory of the streaming HF export against the largest tensor it writes.

    python tools/bench_export_memory.py [--vocab 1048576] [--out DIR]

Builds a tiny Qwen3 whose embedding (vocab x hidden, fp32) dwarfs every other tensor, converts it to a
megatron-core checkpoint, then exports it in a fresh process whose peak RSS is reset (Linux
/proc/self/clear_refs) after the modules the export imports: the printed ratio is (peak RSS - RSS before the export) /
largest tensor bytes. The export holds one tensor at a time, so the ratio stays near 1.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, re, sys
import tqdm, replay_megatron.models.hf_export, replay_megatron.models.qwen3  # what export_hf imports
from replay_megatron.training.export import export_hf

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
before = status("VmRSS")
export_hf(sys.argv[1], sys.argv[2], None, max_shard_bytes=int(sys.argv[3]), progress=False)
print(json.dumps({"rss_before": before, "peak_rss": status("VmHWM")}))
"""


def export_memory(work: Path, vocab: int, hidden: int = 64, max_shard_bytes: int = 5 * 10 ** 9) -> dict[str, float]:
    """{"largest_tensor", "peak_increase", "ratio", "files"} of exporting a model with a vocab x hidden embedding."""
    from replay_megatron.models.checkpoint import convert_hf_to_megatron
    from replay_megatron.models.presets import preset

    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf = preset("qwen3-tiny", vocab_size=vocab, hidden_size=hidden)
    Qwen3ForCausalLM(Qwen3Config(**hf)).save_pretrained(work / "hf")
    convert_hf_to_megatron(str(work / "hf"), str(work / "mcore"), tp=1, pp=1)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(work / "mcore"), str(work / "export"),
                          str(max_shard_bytes)], check=True, capture_output=True, text=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    largest = vocab * hidden * 4
    increase = measured["peak_rss"] - measured["rss_before"]
    return {"largest_tensor": largest, "peak_increase": increase, "ratio": increase / largest,
            "files": sorted(p.name for p in (work / "export").iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=1 << 20, help="vocabulary (embedding rows), default 2^20")
    parser.add_argument("--out", help="work dir (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = export_memory(Path(args.out or tmp), args.vocab)
    print(f"largest tensor {r['largest_tensor'] / 2 ** 20:.1f} MiB, export peak RSS increase "
          f"{r['peak_increase'] / 2 ** 20:.1f} MiB, ratio {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
