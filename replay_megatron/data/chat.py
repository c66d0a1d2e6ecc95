"""Conversations -> token ids and loss masks through a Hugging Face tokenizer's own chat template.

Two routes to the assistant tokens:
- a template that marks them with `{% generation %}` is rendered once by `apply_chat_template(...,
  return_assistant_tokens_mask=True)`, and the mask is the template's;
- otherwise (Qwen3's template among them) turn by turn: assistant turn i starts where the render of
  messages[:i] with the generation prompt ends (that must be a prefix of the whole conversation's
  render; with `enable_thinking=False`, Qwen3 renders earlier turns without the think block its
  generation prompt holds, so there the plain generation prompt is tried too) and runs through the
  first end-of-sequence token after it. The text is tokenized piece by
  piece at those boundaries, so each prompt's tokens are exactly what a generator would start from.

Thinking models: `enable_thinking` is passed to the template when set. The empty think block
("<think>\\n\\n</think>\\n\\n") that Qwen3's template inserts in front of an answer without reasoning is
not trained on unless `train_empty_think` is set: it is template scaffolding, not the model's answer.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
EMPTY_THINK = re.compile(r"\s*<think>\s*</think>\s*")
_THINK_TOKENS_MAX = 16  # an empty think block is a handful of tokens in any tokenizer


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation becomes a training sample (recorded in the token store's meta.json)."""

    loss_on: Literal["all", "last"] = "all"  # every assistant turn, or the last one only
    enable_thinking: bool | None = None  # passed to the chat template when not None
    train_empty_think: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Spans = list[tuple[int, int]]  # [start, end) token ranges of assistant turns


def mask_from_spans(n: int, spans: Spans) -> list[int]:
    mask = [0] * n
    for a, b in spans:
        mask[a:b] = [1] * (b - a)
    return mask


def select_turns(spans: Spans, options: ChatOptions) -> Spans:
    """The assistant spans that carry loss under `options.loss_on`."""
    return spans[-1:] if options.loss_on == "last" else spans


def skip_empty_think(ids: Sequence[int], spans: Spans, decode: Callable[[Sequence[int]], str]) -> Spans:
    """Each span without its leading empty think block (found by decoding its first few tokens)."""
    out = []
    for a, b in spans:
        cut = 0
        for k in range(1, min(b - a, _THINK_TOKENS_MAX) + 1):
            if EMPTY_THINK.fullmatch(decode(ids[a:a + k])):
                cut = k
        out.append((a + cut, b))
    return out


def _runs(mask: Sequence[int]) -> Spans:
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _template_marked(tok: Any, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> tuple[list[int], Spans]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  **kwargs)
    return list(out["input_ids"]), _runs(out["assistant_masks"])


def _turn_by_turn(tok: Any, messages: list[dict[str, str]], kwargs: dict[str, Any], eos_id: int,
                  where: str) -> tuple[list[int], Spans]:
    def render(msgs: list[dict[str, str]], generation_prompt: bool, options: dict[str, Any] = kwargs) -> str:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt, **options)

    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant message, so nothing to train on")
    full, eos_text = render(messages, False), tok.convert_ids_to_tokens(eos_id)
    chars = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(messages[:i], True)
        if not full.startswith(head):  # an earlier turn of a thinking template is rendered without its think block
            head = render(messages[:i], True, {})
        if not full.startswith(head):
            raise ValueError(f"chat template of {where} does not render the conversation as generation prompt + "
                             f"answer at message {i}, so the assistant tokens cannot be located")
        start = len(head)
        end = full.find(eos_text, start)
        end = len(full) if end < 0 else end + len(eos_text)
        upto = render(messages[:i + 1], False)
        if full.startswith(upto) and len(upto) > start:
            end = min(end, len(upto))
        chars.append((start, end))
    cuts = sorted({0, len(full), *(c for span in chars for c in span)})
    ids: list[int] = []
    spans: Spans = []
    for a, b in zip(cuts, cuts[1:]):
        piece = list(tok.encode(full[a:b], add_special_tokens=False))
        if (a, b) in chars:
            spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    if eos_id not in ids[spans[-1][0]:]:  # a template that ends the answer without the EOS token
        ids.append(eos_id)
        spans[-1] = (spans[-1][0], len(ids))
    return ids, spans


def encode_chat_hf(tok: Any, messages: list[dict[str, str]], options: ChatOptions, eos_id: int,
                   where: str) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on the trained assistant tokens) of `messages` under `tok`'s template."""
    template = tok.chat_template
    if not template:
        raise ValueError(f"tokenizer at {where} has no chat_template; instruction data needs one "
                         f"(or preprocess with --format text)")
    kwargs = {} if options.enable_thinking is None else {"enable_thinking": options.enable_thinking}
    if GENERATION_TAG.search(template):
        ids, spans = _template_marked(tok, messages, kwargs)
    else:
        ids, spans = _turn_by_turn(tok, messages, kwargs, eos_id, where)
    spans = select_turns(spans, options)
    if not options.train_empty_think:
        spans = skip_empty_think(ids, spans, lambda piece: tok.decode(list(piece), skip_special_tokens=False))
    return ids, mask_from_spans(len(ids), spans)
