"""Chat conversations -> ids and loss masks: Qwen3's template (thinking, multi-turn), generation-marked
templates, the sentencepiece template; masks checked token by token."""
import pytest

from chat_fixtures import build_qwen3_tokenizer
from replay_megatron.data.chat import ChatOptions
from replay_megatron.data.tokenizer import HFTokenizer, SentencePieceTokenizer, train_sentencepiece

SYS, U1, A1, U2, A2 = "You are terse.", "What is 7 + 3?", "10", "And 12 + 30?", "The answer is 42."
TALK = [{"role": "system", "content": SYS}, {"role": "user", "content": U1}, {"role": "assistant", "content": A1},
        {"role": "user", "content": U2}, {"role": "assistant", "content": A2}]
GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return HFTokenizer(build_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3")))


def runs(tok, ids, mask):
    """(mask value, decoded text) per maximal run of equal mask values, each token decoded on its own."""
    out = []
    for i, m in zip(ids, mask):
        text = tok.tok.decode([i], skip_special_tokens=False)
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1] + text)
        else:
            out.append((m, text))
    return out


def head(*turns):
    return "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns) + "<|im_start|>assistant\n"


def test_qwen3_multi_turn_trains_every_answer_without_the_empty_think_block(qwen3):
    ids, mask = qwen3.encode_chat(TALK)
    assert runs(qwen3, ids, mask) == [
        (0, head(("system", SYS), ("user", U1))), (1, f"{A1}<|im_end|>"),
        (0, "\n" + head(("user", U2)) + "<think>\n\n</think>\n\n"), (1, f"{A2}<|im_end|>"), (0, "\n")]
    # the prompt of the last turn is exactly what a generator starts from
    rendered = qwen3.tok.apply_chat_template(TALK[:-1], tokenize=False, add_generation_prompt=True)
    assert qwen3.tok.decode(ids[:len(qwen3.encode(rendered))], skip_special_tokens=False) == rendered


def test_qwen3_loss_on_last_turn_only(qwen3):
    ids, mask = qwen3.encode_chat(TALK, ChatOptions(loss_on="last"))
    assert [m for m, _ in runs(qwen3, ids, mask)] == [0, 1, 0]
    assert runs(qwen3, ids, mask)[1] == (1, f"{A2}<|im_end|>")


def test_qwen3_thinking_choices(qwen3):
    talk = TALK[1:3]
    base = runs(qwen3, *qwen3.encode_chat(talk))
    assert base == [(0, head(("user", U1)) + "<think>\n\n</think>\n\n"), (1, f"{A1}<|im_end|>"), (0, "\n")]
    # enable_thinking=False puts the empty block into the generation prompt: the same sample
    assert runs(qwen3, *qwen3.encode_chat(talk, ChatOptions(enable_thinking=False))) == base
    trained = runs(qwen3, *qwen3.encode_chat(talk, ChatOptions(train_empty_think=True)))
    assert trained == [(0, head(("user", U1))), (1, f"<think>\n\n</think>\n\n{A1}<|im_end|>"), (0, "\n")]
    # real reasoning is part of the answer and trained
    thought = [talk[0], {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n10"}]
    assert runs(qwen3, *qwen3.encode_chat(thought))[1] == (1, "<think>\nadd them\n</think>\n\n10<|im_end|>")


def test_generation_marked_template_uses_the_templates_mask(tmp_path):
    marked = HFTokenizer(build_qwen3_tokenizer(tmp_path / "marked", GENERATION_TEMPLATE))
    plain = HFTokenizer(build_qwen3_tokenizer(tmp_path / "plain", GENERATION_TEMPLATE.replace(
        "{% generation %}", "").replace("{% endgeneration %}", "")))
    for options in (ChatOptions(), ChatOptions(loss_on="last")):
        ids, mask = marked.encode_chat(TALK, options)
        assert (ids, mask) == plain.encode_chat(TALK, options)
        first = head(("system", SYS), ("user", U1))
        middle = "\n" + head(("user", U2))
        expected = [(0, first), (1, f"{A1}<|im_end|>"), (0, middle)] if options.loss_on == "all" else \
            [(0, first + f"{A1}<|im_end|>" + middle)]
        assert runs(marked, ids, mask) == [*expected, (1, f"{A2}<|im_end|>"), (0, "\n")]


def test_sentencepiece_multi_turn_mask_and_no_system_role(tmp_path):
    from chat_fixtures import CORPUS

    sp = SentencePieceTokenizer(train_sentencepiece(CORPUS, tmp_path / "t.model", vocab_size=400))
    ids, mask = sp.encode_chat(TALK[1:])
    expected = [sp.bos_id, sp.user_id, *sp.encode(U1), sp.assistant_id, *sp.encode(A1), sp.eos_id,
                sp.user_id, *sp.encode(U2), sp.assistant_id, *sp.encode(A2), sp.eos_id]
    assert ids == expected
    a1, a2 = len(sp.encode(A1)) + 1, len(sp.encode(A2)) + 1
    n1 = 2 + len(sp.encode(U1)) + 1
    n2 = 1 + len(sp.encode(U2)) + 1
    assert mask == [0] * n1 + [1] * a1 + [0] * n2 + [1] * a2
    assert sp.encode_chat(TALK[1:], ChatOptions(loss_on="last"))[1] == [0] * (n1 + a1 + n2) + [1] * a2
    with pytest.raises(ValueError, match="sentencepiece template has no 'system' role"):
        sp.encode_chat(TALK)


def test_qwen3_multi_turn_without_thinking_renders_history_plainly(qwen3):
    ids, mask = qwen3.encode_chat(TALK, ChatOptions(enable_thinking=False))
    assert runs(qwen3, ids, mask) == [
        (0, head(("system", SYS), ("user", U1))), (1, f"{A1}<|im_end|>"),
        (0, "\n" + head(("user", U2)) + "<think>\n\n</think>\n\n"), (1, f"{A2}<|im_end|>"), (0, "\n")]
