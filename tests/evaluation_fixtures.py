"""Shared helpers of the evaluation tests: a base/fine-tuned HF pair, HF reference losses and distances, a held-out token store."""
import math

import torch

from qwen3_fixtures import tiny_hf_config, tiny_hf_model


SEQ = 16


LOSS_TOL = 1e-5


def hf_pair(vocab_size=500):
    """(hf config, base HF model, fine-tuned HF model); vocab 500 is padded to 512 by the megatron model."""
    hf = tiny_hf_config(vocab_size=vocab_size)
    base = tiny_hf_model(hf, seed=0)
    ft = tiny_hf_model(hf, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ft.parameters():  # the tied embedding/output weight is one parameter: perturbed once
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return hf, base, ft


def write_eval_store(path, hf, n=5):
    """A token store of `n` samples (lengths 6..SEQ+1, loss on the last two thirds of each)."""
    from replay_megatron.data.token_store import TokenStoreWriter

    g = torch.Generator().manual_seed(11)
    writer = TokenStoreWriter(path)
    samples = []
    for i in range(n):
        length = [SEQ + 1, 6, 11, SEQ, 9][i % 5]
        tokens = torch.randint(1, hf["vocab_size"], (length,), generator=g).tolist()
        mask = [0] * (length // 3) + [1] * (length - length // 3)
        writer.add(f"s{i}", tokens, mask)
        samples.append((tokens, mask))
    writer.close({"tokenizer": {"kind": "test", "fingerprint": "x", "vocab_size": hf["vocab_size"], "pad_id": 0,
                                "eos_id": 1}, "seq_length": SEQ})
    return samples


def hf_reference_loss(model, samples):
    """Per-token mean next-token CE over loss-bearing tokens, one unpadded sample at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, mask in samples:
            ids = torch.tensor([tokens])
            logits = model(input_ids=ids).logits[0, :-1].double()
            ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            m = torch.tensor(mask[1:], dtype=torch.bool)
            total += ce[m].sum().item()
            count += int(m.sum())
    return total / count, count


def reference_distance(ft, base):
    diff = sum((a.double() - b.double()).square().sum().item() for a, b in zip(ft.parameters(), base.parameters()))
    norm = sum(b.double().square().sum().item() for b in base.parameters())
    return math.sqrt(diff) / math.sqrt(norm)
