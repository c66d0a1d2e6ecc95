"""Data layer: tokenizers, `preprocess` into a memory-mapped token store, and GPT micro-batches from it.

- `tokenizer`: the `Tokenizer` interface (sentencepiece model or HF directory), instruction loss masks.
- `preprocess`: JSONL instruction data / plain text -> token store, with file:line errors.
- `token_store`: the on-disk format (`TokenStoreWriter`, `TokenDataset`) and its fingerprints.
- `dataset`: `make_batch` (Megatron GPT layout), epoch order, DP-sharded resumable micro-batches.
"""
