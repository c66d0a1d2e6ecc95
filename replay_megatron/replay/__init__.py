"""Stage 0 of Logits Replay (SPEC.md section 1): dynamic Top-K selection, position strategies, the store.

    dynamic_topk(logits, targets, tau, k_max, *, vocab_start=0, tp_group=None, return_logits=False)
        -> TopKSelection(candidates, k, covered_mass, candidate_logits, lse)
    gold_probability(logits, targets, *, vocab_start=0, tp_group=None) -> c_t = p_t(x_t)
    select_positions(strategy, positions, *, sample_id, seed, amount=0.5, confidences=None, buckets=5)
    ReplayStoreWriter(directory, rank, *, k_max, logits_dtype=None, commit_every=256)
        .committed_sample_ids, .add(sample_id, positions, targets, selection), .commit(), .close()
    finalize_store(directory, num_shards, *, config, fingerprints, vocab_size) -> manifest
    ReplayStore.open(directory, expect=None, verify=True) -> .get(sample_id), .sample_ids(), .summary()
    fingerprint_files(paths), fingerprint_json(obj), fingerprint_state_dict(state_dict)
"""
from replay_megatron.replay.fingerprint import fingerprint_files, fingerprint_json, fingerprint_state_dict
from replay_megatron.replay.positions import DEFAULT_AMOUNT, DEFAULT_BUCKETS, STRATEGIES, select_positions
from replay_megatron.replay.selection import TopKSelection, dynamic_topk, gold_probability
from replay_megatron.replay.store import FORMAT_VERSION, ReplaySample, ReplayStore, ReplayStoreError
from replay_megatron.replay.store_writer import ReplayStoreWriter, finalize_store

__all__ = ["DEFAULT_AMOUNT", "DEFAULT_BUCKETS", "FORMAT_VERSION", "STRATEGIES", "ReplaySample", "ReplayStore",
           "ReplayStoreError", "ReplayStoreWriter", "TopKSelection", "dynamic_topk", "finalize_store",
           "fingerprint_files", "fingerprint_json", "fingerprint_state_dict", "gold_probability",
           "select_positions"]
