"""A Hugging Face model loaded in a process where the CPU adapter is active (eval's domain metric runs inside
the megatron job) generates what it generates in a plain process, when loaded under
`cpu_adapter.factories_restored()`; loaded under the adapter's factory wrappers it does not (the bug)."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

CHILD = """
import contextlib, json, sys, torch
mode, path = sys.argv[1], sys.argv[2]
ctx = contextlib.nullcontext()
if mode != "plain":
    from replay_megatron.platform import cpu_adapter
    cpu_adapter.activate()
    if mode == "restored":
        ctx = cpu_adapter.factories_restored()
from transformers import AutoModelForCausalLM
from replay_megatron.evaluation.domain import greedy_generate
with ctx:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
print(json.dumps(greedy_generate(model, [[5, 6, 7, 8, 9], [10, 11, 12]], max_new_tokens=12, eos_id=127, pad_id=0)))
"""


def _generate(mode: str, path: str) -> list[list[int]]:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hf_generation_under_the_cpu_adapter_equals_a_plain_process(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)  # large init: a random model whose greedy continuations are not constant
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=128, tie_word_embeddings=False,
                      max_position_embeddings=128, initializer_range=0.5)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)
    plain = _generate("plain", str(tmp_path))
    assert _generate("restored", str(tmp_path)) == plain
    assert _generate("wrapped", str(tmp_path)) != plain, \
        "loading under the factory wrappers no longer changes generation: factories_restored may be unneeded"
