"""GPT micro-batches: label shift and loss-mask alignment, padding, epoch order and DP sharding/resume."""
import json

import numpy as np
import pytest
import torch

from replay_megatron.data.dataset import (
    batch_of, epoch_order, make_batch, num_microbatches, sequential_micro_batches, train_micro_batches,
)
from replay_megatron.data.formats import exchange
from replay_megatron.data.preprocess import fit_to_length, preprocess
from replay_megatron.data.token_store import TokenDataset
from replay_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

PAIRS = [("What is 3 + 4?", "7"), ("Reverse the word stone.", "enots"), ("List names.", "SELECT name FROM t"),
         ("a much longer prompt " * 4, "and a long answer " * 3)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    tok_path = train_sentencepiece([p + " " + r for p, r in PAIRS] * 50, d / "t.model", vocab_size=400)
    src = d / "data.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    preprocess(src, tok_path, d / "store", seq_length=32, progress=False)
    return TokenDataset(d / "store"), SentencePieceTokenizer(tok_path)


def test_labels_are_next_tokens_and_mask_marks_response_labels(store):
    ds, tok = store
    seq = 32
    batch = make_batch([ds[i] for i in range(len(ds))], seq, tok.pad_id)
    assert batch.tokens.shape == batch.labels.shape == batch.loss_mask.shape == (len(ds), seq)
    assert batch.tokens.dtype == batch.labels.dtype == torch.int64 and batch.loss_mask.dtype == torch.float32
    assert batch.sample_ids.tolist() == list(range(len(ds)))
    assert torch.equal(batch.position_ids, torch.arange(seq).expand(len(ds), seq))
    for row, (prompt, response) in enumerate(PAIRS):
        ids, _, _ = fit_to_length(*tok.encode_chat(exchange(prompt, response)), seq, "tail")
        n = len(ids) - 1
        for t in range(seq):  # brute force over every position
            assert batch.tokens[row, t] == (ids[t] if t < n else tok.pad_id)
            assert batch.labels[row, t] == (ids[t + 1] if t < n else tok.pad_id)
        # The loss-bearing labels are exactly the response tokens and EOS (the tail of them when truncated).
        full = tok.encode(response) + [tok.eos_id]
        targets = batch.labels[row][batch.loss_mask[row] == 1].tolist()
        assert targets == full[-len(targets):] and (len(targets) == len(full) or len(ids) == seq + 1)
        assert batch.loss_mask[row, n:].sum() == 0  # padding carries no loss
    assert batch.loss_mask[3].sum() > 0 and len(tok.encode_chat(exchange(*PAIRS[3]))[0]) > seq + 1  # truncated row


def test_longer_sample_than_the_batch_allows_is_refused(store):
    ds, tok = store
    with pytest.raises(ValueError, match=r"sample 3 has 33 tokens, more than seq_length \+ 1 = 17"):
        make_batch([ds[3]], 16, tok.pad_id)


def test_batch_moves_to_a_device_and_batches_streams(store):
    ds, tok = store
    got = [batch_of(ds, idx, 32) for idx in [[0, 1], [2]]]
    assert [b.sample_ids.tolist() for b in got] == [[0, 1], [2]]
    moved = got[0].to("cpu")
    assert torch.equal(moved.tokens, got[0].tokens)


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=1, epoch=0)
    assert sorted(a.tolist()) == list(range(50)) and a.dtype == np.int64
    assert np.array_equal(a, epoch_order(50, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(50, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(50, seed=2, epoch=0))


def _stream(n, seed, length):
    """Reference: the concatenated epoch permutations."""
    return np.concatenate([epoch_order(n, seed, e) for e in range(length // n + 1)])[:length].tolist()


@pytest.mark.parametrize("dp_size,micro", [(1, 4), (2, 2), (4, 1), (2, 1)])
def test_dp_shards_of_each_step_are_the_global_stream_in_megatron_layout(dp_size, micro):
    n, seed, global_batch, steps = 13, 5, 4, 9
    m = num_microbatches(global_batch, micro, dp_size)
    per_rank = [train_micro_batches(n, micro, dp_size, r, seed) for r in range(dp_size)]
    stream = _stream(n, seed, global_batch * steps)
    for k in range(steps):
        got = {r: [next(it) for _ in range(m)] for r, it in enumerate(per_rank)}
        for r in range(dp_size):
            for j, mb in enumerate(got[r]):
                start = k * global_batch + j * micro * dp_size + r * micro
                assert mb == stream[start:start + micro]
        assert sorted(i for mbs in got.values() for mb in mbs for i in mb) == \
            sorted(stream[k * global_batch:(k + 1) * global_batch])


def test_resume_from_consumed_samples_continues_the_same_stream():
    n, seed = 10, 0
    full = train_micro_batches(n, 2, 2, 1, seed)
    seen = [next(full) for _ in range(12)]
    resumed = train_micro_batches(n, 2, 2, 1, seed, consumed_samples=5 * 4)
    assert [next(resumed) for _ in range(7)] == seen[5:]
    with pytest.raises(ValueError, match="consumed_samples 6 is not a multiple of micro batch x DP = 4"):
        next(train_micro_batches(n, 2, 2, 1, seed, consumed_samples=6))
    unshuffled = train_micro_batches(n, 3, 1, 0, seed, shuffle=False)
    assert [next(unshuffled) for _ in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]


def test_invalid_layouts_are_refused():
    with pytest.raises(ValueError, match="global batch 6 is not divisible by micro batch 2 x data-parallel size 2"):
        num_microbatches(6, 2, 2)
    with pytest.raises(ValueError, match="dp_rank 2 out of range for dp_size 2"):
        next(train_micro_batches(10, 1, 2, 2, 0))


@pytest.mark.parametrize("n,micro,dp", [(10, 3, 2), (7, 4, 3), (1, 2, 2), (8, 2, 2)])
def test_sequential_pass_covers_every_sample_once(n, micro, dp):
    shards = [list(sequential_micro_batches(n, micro, dp, r)) for r in range(dp)]
    flat = sorted(i for s in shards for mb in s for i in mb)
    assert flat == list(range(n))
    assert all(1 <= len(mb) <= micro for s in shards for mb in s)
