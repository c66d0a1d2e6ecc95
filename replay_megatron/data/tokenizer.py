"""Tokenizers behind one small interface: a sentencepiece model file or a Hugging Face tokenizer directory.

`encode_chat(messages, options)` returns the ids of one training conversation and its loss mask, 1 on
exactly the tokens the model must learn to produce (the assistant turns and their end-of-sequence
tokens; see chat.py for the options); `encode_prompt(prompt)` is the prefix a generator starts from, so
training and inference see the same ids. `fingerprint()` is the sha256 of the tokenizer files, stored with every artifact built from token
ids so that a mismatched tokenizer is refused rather than silently mixed.

Sentencepiece instruction template (special tokens are control symbols, so no text can produce them):

    <s> <|user|> {prompt} <|assistant|> {response} </s>        loss mask: 1 on {response} and </s>

and for more turns `<|user|> {prompt} <|assistant|> {response} </s>` again (it has no system role).

Hugging Face: the tokenizer's own chat template (chat.py): each assistant turn runs from the end of the
generation prompt up to and including the first EOS (anything the template puts after EOS, such as a
newline, is kept with mask 0), or as the template's `{% generation %}` marks say.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from replay_megatron.atomic_io import atomic_write_bytes
from replay_megatron.data.chat import ChatOptions, encode_chat_hf, mask_from_spans, select_turns

USER, ASSISTANT = "<|user|>", "<|assistant|>"
# Files that define a Hugging Face tokenizer; a checkpoint directory's weights are not part of it.
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
)


@runtime_checkable
class Tokenizer(Protocol):
    """What preprocessing, Stage 0/1 and evaluation need from a tokenizer."""

    kind: str  # "sentencepiece" | "huggingface"
    path: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def encode_prompt(self, prompt: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, str]],
                    options: ChatOptions = ChatOptions()) -> tuple[list[int], list[int]]: ...
    def fingerprint(self) -> str: ...


def _sha256_files(files: Iterable[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        data = f.read_bytes()
        h.update(f"{f.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


class SentencePieceTokenizer:
    """A sentencepiece `.model` file with the template above (needs the control symbols <|user|>,
    <|assistant|> and a pad id, as `train_sentencepiece` makes them)."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.path = str(model_path)
        self._model_bytes = Path(model_path).read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id, self.bos_id, self.pad_id = self.sp.eos_id(), self.sp.bos_id(), self.sp.pad_id()
        self.user_id, self.assistant_id = self.sp.piece_to_id(USER), self.sp.piece_to_id(ASSISTANT)
        missing = [name for name, i in (("eos", self.eos_id), ("bos", self.bos_id), ("pad", self.pad_id)) if i < 0]
        missing += [s for s, i in ((USER, self.user_id), (ASSISTANT, self.assistant_id))
                    if i == self.sp.unk_id() or not self.sp.is_control(i)]
        if missing:
            raise ValueError(f"sentencepiece model {model_path} lacks {', '.join(missing)}; "
                             f"train it with replay_megatron.data.tokenizer.train_sentencepiece")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def encode_prompt(self, prompt: str) -> list[int]:
        return [self.bos_id, self.user_id, *self.encode(prompt), self.assistant_id]

    def encode_chat(self, messages: list[dict[str, str]],
                    options: ChatOptions = ChatOptions()) -> tuple[list[int], list[int]]:
        ids, spans = [self.bos_id], []
        for m in messages:
            if m["role"] == "user":
                ids += [self.user_id, *self.encode(m["content"]), self.assistant_id]
            elif m["role"] == "assistant":
                answer = [*self.encode(m["content"]), self.eos_id]
                spans.append((len(ids), len(ids) + len(answer)))
                ids += answer
            else:
                raise ValueError(f"the sentencepiece template has no {m['role']!r} role (only user and assistant); "
                                 f"use a Hugging Face tokenizer with a chat template for system prompts")
        return ids, mask_from_spans(len(ids), select_turns(spans, options))

    def fingerprint(self) -> str:
        return hashlib.sha256(self._model_bytes).hexdigest()


class HFTokenizer:
    """A Hugging Face tokenizer directory (`AutoTokenizer`), instruction data through its chat template."""

    kind = "huggingface"

    def __init__(self, directory: str | Path):
        from transformers import AutoTokenizer

        self.path = str(directory)
        self.root = Path(directory)
        self.tok = AutoTokenizer.from_pretrained(str(directory))
        if self.tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {directory} has no eos_token")
        self.vocab_size = len(self.tok)
        self.eos_id = int(self.tok.eos_token_id)
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        if not self.tok.chat_template:
            raise ValueError(f"tokenizer at {self.path} has no chat_template; instruction data needs one "
                             f"(or preprocess with --format text)")
        return self.encode(self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True))

    def encode_chat(self, messages: list[dict[str, str]],
                    options: ChatOptions = ChatOptions()) -> tuple[list[int], list[int]]:
        return encode_chat_hf(self.tok, messages, options, self.eos_id, self.path)

    def fingerprint(self) -> str:
        return _sha256_files([self.root / n for n in HF_TOKENIZER_FILES if (self.root / n).is_file()], self.root)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A directory is a Hugging Face tokenizer; a file is a sentencepiece model."""
    p = Path(path)
    if p.is_dir():
        return HFTokenizer(p)
    if p.is_file():
        return SentencePieceTokenizer(p)
    raise FileNotFoundError(f"tokenizer not found: {p} (give a sentencepiece .model file or an HF tokenizer directory)")


def train_sentencepiece(texts: Iterable[str], out_path: str | Path, vocab_size: int = 1024,
                        model_type: str = "bpe") -> Path:
    """Train a sentencepiece model for `SentencePieceTokenizer` on `texts` and write it atomically.

    Byte fallback and identity normalisation make every string round-trip, except that U+2581 ("▁",
    sentencepiece's own whitespace marker) decodes as a space; digits are split (one token
    per digit, which helps small models with arithmetic); ids 0-3 are <pad>, <unk>, <s>, </s>, then the
    control symbols <|user|>, <|assistant|>. `vocab_size` is an upper bound: on a small corpus the model
    stops when no more pieces exist. Deterministic for the same texts and settings.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, control_symbols=[USER, ASSISTANT],
        num_threads=2, minloglevel=2,
    )
    return atomic_write_bytes(out_path, buf.getvalue())
