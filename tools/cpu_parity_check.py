"""The CPU main job until the demo lands: a tiny random Qwen3 through Hugging Face and through megatron-core
at TP2 on 2 gloo processes, printing the logit and loss differences (exit 1 above --tol).

    python tools/cpu_parity_check.py [--tp 2] [--pp 1] [--tol 1e-4]
"""
from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--preset", default="qwen3-tiny")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from replay_megatron.models.parity import compare_logits, megatron_logits_on_rank
    from replay_megatron.models.presets import preset
    from replay_megatron.platform.spawn import run_local

    hf = preset(args.preset)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**hf)).float().eval()
    batches = [torch.randint(0, hf["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    with torch.no_grad():
        reference = [model(t).logits for t in batches]
    print(f"HF {args.preset} vs megatron-core at TP{args.tp} x PP{args.pp} on {args.tp * args.pp} CPU processes (gloo)")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = run_local(megatron_logits_on_rank, args.tp * args.pp, hf, sd, batches, args.tp, args.pp)
    report = compare_logits(reference, next(r for r in results if r is not None), batches)
    print(report)
    ok = report.max_abs <= args.tol
    print("PASS" if ok else f"FAIL: max |delta logit| above {args.tol}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
