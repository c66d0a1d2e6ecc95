"""Tokenizers built locally (no hub) for chat-template tests: Qwen3's special tokens and chat template."""
from __future__ import annotations

from pathlib import Path

QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
# Qwen3's added tokens: the special ones, then the ones that are plain text to the model (<think>, ...).
QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN3_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
CORPUS = [f"What is {a} + {b}? The answer is {a + b}. SELECT name FROM staff WHERE dept = 'sales'"
          for a in range(0, 300, 7) for b in range(3, 90, 11)]


def build_qwen3_tokenizer(directory: Path, chat_template: str = QWEN3_TEMPLATE) -> Path:
    """A byte-level BPE tokenizer with Qwen3's added tokens, eos/pad and chat template, saved to `directory`."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=QWEN3_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = chat_template
    tok.save_pretrained(directory)
    return directory
