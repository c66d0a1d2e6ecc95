"""A run's tokenizer written into an HF export, so `AutoTokenizer` (lm-eval, vLLM) needs nothing else.

A Hugging Face tokenizer directory is copied as it is (its files, chat template included). A sentencepiece
model (the demo's) becomes a `tokenizer.json` built with the `tokenizers` library that encodes every text
to the same ids: its vocabulary and BPE merges (ordered by piece id, which is sentencepiece's merge
priority for BPE), byte fallback, a Metaspace pre-tokenizer that adds the "▁" dummy prefix to every run
of text between special tokens (sentencepiece encodes the prompt and the response on their own), and the
control symbols as special tokens. Its chat template renders exactly `SentencePieceTokenizer`'s
instruction template (see data/tokenizer.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from replay_megatron.data.tokenizer import ASSISTANT, HF_TOKENIZER_FILES, USER, SentencePieceTokenizer, load_tokenizer

# SentencePieceTokenizer's template: <s> <|user|> {prompt} <|assistant|> {response} </s>
SENTENCEPIECE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant messages are supported') }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def _bpe_merges(pieces: dict[str, int]) -> list[tuple[str, str]]:
    """Merges that rebuild each piece from two shorter ones, in the order of the piece's id."""
    merges = []
    for piece, rank in pieces.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                merges.append((rank, pieces[left], pieces[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def sentencepiece_to_hf(model_path: str | Path, out_dir: str | Path) -> None:
    """Write `model_path` (a `train_sentencepiece` BPE model) as an HF fast tokenizer into `out_dir`."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceTokenizer(model_path)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise ValueError(f"{model_path}: only sentencepiece BPE models are exported (this one is "
                         f"{proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)})")
    if proto.normalizer_spec.name != "identity" or proto.normalizer_spec.remove_extra_whitespaces:
        raise ValueError(f"{model_path}: only the identity normalization without whitespace removal is "
                         f"exported (train it with replay_megatron.data.tokenizer.train_sentencepiece)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (p.NORMAL, p.USER_DEFINED)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(normal), unk_token=sp.sp.id_to_piece(sp.sp.unk_id()),
                               byte_fallback=True, fuse_unk=True))
    prefix = proto.normalizer_spec.add_dummy_prefix  # "▁" before every run of text, as sentencepiece does
    raw.normalizer = normalizers.Sequence([*([normalizers.Prepend("\u2581")] if prefix else []),
                                           normalizers.Replace(" ", "\u2581")])
    splits = [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)]
    if proto.trainer_spec.split_digits:  # a digit never merges with a neighbour
        splits.append(pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"))
    raw.pre_tokenizer = pre_tokenizers.Sequence(splits)
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    specials = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)]
    raw.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    piece = sp.sp.id_to_piece
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=piece(sp.bos_id), eos_token=piece(sp.eos_id),
                                  pad_token=piece(sp.pad_id), unk_token=piece(sp.sp.unk_id()),
                                  additional_special_tokens=[USER, ASSISTANT], clean_up_tokenization_spaces=False)
    tok.chat_template = SENTENCEPIECE_CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))


def export_tokenizer(source: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Put the tokenizer `source` (sentencepiece file or HF directory) into `out_dir`; returns its special
    token ids {"bos_token_id", "eos_token_id", "pad_token_id"} (bos absent when it has none)."""
    source = Path(source)
    tokenizer = load_tokenizer(source)
    if tokenizer.kind == "sentencepiece":
        sentencepiece_to_hf(source, out_dir)
    else:
        for name in HF_TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, Path(out_dir) / name)
    ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None and tokenizer.kind == "huggingface":
        bos = tokenizer.tok.bos_token_id
    if bos is not None:
        ids["bos_token_id"] = int(bos)
    return ids
