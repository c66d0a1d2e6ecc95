"""Tokenizers: round trip, instruction loss masks (response + EOS exactly), fingerprints, HF chat template."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_megatron.data.formats import exchange
from replay_megatron.data.tokenizer import (
    ASSISTANT, USER, HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, train_sentencepiece,
)

CORPUS = [f"What is {a} + {b}? The answer is {a + b}. SELECT name FROM staff WHERE dept = 'sales'"
          for a in range(0, 300, 7) for b in range(3, 90, 11)]

QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp") / "t.model", vocab_size=400)


@pytest.fixture(scope="module")
def sp(sp_path):
    return SentencePieceTokenizer(sp_path)


def build_hf_tokenizer(directory, chat_template=QWEN_LIKE_TEMPLATE):
    """A byte-level BPE tokenizer built locally (no hub), saved as an HF tokenizer directory."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return HFTokenizer(build_hf_tokenizer(tmp_path_factory.mktemp("hf")))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",))))
def test_sentencepiece_round_trips_any_text(sp, text):
    assert sp.decode(sp.encode(text)) == text


def test_sentencepiece_special_ids_and_control_symbols(sp):
    assert (sp.pad_id, sp.eos_id) == (0, 3)
    assert isinstance(sp, Tokenizer)
    assert sp.vocab_size <= 400
    # Control symbols come only from the template, never from text.
    assert sp.user_id not in sp.encode(f"{USER} hi {ASSISTANT}")
    assert sp.assistant_id not in sp.encode(f"{USER} hi {ASSISTANT}")


@pytest.mark.parametrize("prompt,response", [("What is 3 + 4?", "7"), ("", "x"), ("q", ""),
                                             ("Schema: t(a) . Question: ?", "SELECT a FROM t")])
def test_sentencepiece_instruction_mask_is_exactly_response_and_eos(sp, prompt, response):
    ids, mask = sp.encode_chat(exchange(prompt, response))
    assert len(ids) == len(mask)
    head = sp.encode_prompt(prompt)
    assert head == [sp.bos_id, sp.user_id, *sp.encode(prompt), sp.assistant_id]
    assert ids[:len(head)] == head and not any(mask[:len(head)])
    assert [i for i, m in zip(ids, mask) if m] == sp.encode(response) + [sp.eos_id]


def test_sentencepiece_training_is_deterministic_and_fingerprint_tracks_bytes(sp_path, sp, tmp_path):
    again = train_sentencepiece(CORPUS, tmp_path / "again.model", vocab_size=400)
    assert again.read_bytes() == sp_path.read_bytes()
    assert SentencePieceTokenizer(again).fingerprint() == sp.fingerprint()
    other = train_sentencepiece(CORPUS, tmp_path / "other.model", vocab_size=350)
    assert SentencePieceTokenizer(other).fingerprint() != sp.fingerprint()


def test_sentencepiece_model_without_template_symbols_is_refused(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=100, minloglevel=2)
    with pytest.raises(ValueError, match=r"lacks pad, <\|user\|>, <\|assistant\|>.*train_sentencepiece"):
        SentencePieceTokenizer(tmp_path / "plain.model")


def test_hf_encode_decode_and_ids(hf):
    assert isinstance(hf, Tokenizer)
    text = "What is 12 + 30? SELECT name FROM staff"
    assert hf.decode(hf.encode(text)) == text
    assert hf.eos_id == hf.tok.convert_tokens_to_ids("<|im_end|>")
    assert hf.pad_id == hf.tok.convert_tokens_to_ids("<|endoftext|>")
    assert hf.vocab_size == len(hf.tok)


def test_hf_instruction_mask_follows_the_chat_template(hf):
    prompt, response = "What is 12 + 30?", "The answer is 42."
    ids, mask = hf.encode_chat(exchange(prompt, response))
    head = hf.encode_prompt(prompt)
    assert ids[:len(head)] == head and not any(mask[:len(head)])
    assert hf.tok.decode(head) == "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
    # Targets: the response tokens and <|im_end|>; the template's trailing newline is kept unmasked.
    assert [i for i, m in zip(ids, mask) if m] == hf.encode(response) + [hf.eos_id]
    assert mask[-1] == 0 and hf.tok.decode(ids[-1:]) == "\n"


def test_hf_template_without_eos_gets_one_appended(tmp_path):
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    tok = HFTokenizer(build_hf_tokenizer(tmp_path, template))
    ids, mask = tok.encode_chat(exchange("hi", "ok"))
    assert ids[-1] == tok.eos_id and mask[-1] == 1


def test_hf_errors_name_the_directory(tmp_path):
    tok = HFTokenizer(build_hf_tokenizer(tmp_path / "plain", chat_template=None))
    with pytest.raises(ValueError, match=f"{tmp_path / 'plain'} has no chat_template.*--format text"):
        tok.encode_chat(exchange("a", "b"))
    weird = ("{% for m in messages %}{{ m['content'] }}|{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
    tok = HFTokenizer(build_hf_tokenizer(tmp_path / "weird", weird))
    with pytest.raises(ValueError, match="cannot be located"):
        tok.encode_chat(exchange("a", "b"))


def test_hf_fingerprint_covers_tokenizer_files_only(tmp_path, hf):
    d = build_hf_tokenizer(tmp_path / "a")
    fp = HFTokenizer(d).fingerprint()
    assert fp == hf.fingerprint()
    (d / "model.safetensors").write_bytes(b"weights are not part of the tokenizer")
    assert HFTokenizer(d).fingerprint() == fp
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    assert HFTokenizer(d).fingerprint() != fp


def test_load_tokenizer_dispatches_on_path_kind(sp_path, hf, tmp_path):
    assert isinstance(load_tokenizer(sp_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(hf.path), HFTokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer not found: .*missing.model"):
        load_tokenizer(tmp_path / "missing.model")
