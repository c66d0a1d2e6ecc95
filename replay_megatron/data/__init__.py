"""Data layer: tokenizers, `preprocess` into a memory-mapped token store, and GPT micro-batches from it.

- `tokenizer`: the `Tokenizer` interface (sentencepiece model or HF directory), chat loss masks.
- `chat`: conversations through an HF tokenizer's chat template (assistant masks, Qwen3 thinking).
- `formats`: JSONL / JSON / Parquet records in instruction, chat, alpaca, sharegpt shapes; field maps.
- `preprocess`: records or plain text -> token store (truncation, drops, counts), file:line errors.
- `packing`: samples packed into seq_length rows (data.packing); `RowSource` gives the rows batches hold.
- `token_store`: the on-disk format (`TokenStoreWriter`, `TokenDataset`) and its fingerprints.
- `dataset`: `make_batch` (Megatron GPT layout), epoch order, DP-sharded resumable micro-batches.
"""
