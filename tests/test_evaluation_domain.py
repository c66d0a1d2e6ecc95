"""evaluation.domain: batched left-padded greedy generation equals one-at-a-time, EOS cuts; execution accuracy
through an HF export, the demo's data layout and its sentencepiece tokenizer."""
import pytest
import torch

from qwen3_fixtures import hf_state_dict, tiny_hf_config, tiny_hf_model
from replay_megatron.evaluation import domain



@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Quick demo data, its tokenizer (vocab 512 = qwen3-tiny's) and a random tiny HF export."""
    from replay_megatron.demo.generate import DemoDataConfig, generate_demo_data, train_demo_tokenizer
    from replay_megatron.models.checkpoint import write_hf_dir

    root = tmp_path_factory.mktemp("domain")
    generate_demo_data(root / "data", DemoDataConfig.quick(seed=2))
    tokenizer = train_demo_tokenizer(root / "data", vocab_size=512)
    hf = tiny_hf_config()
    write_hf_dir(root / "hf", hf_state_dict(tiny_hf_model(hf)), hf)
    return {"data": root / "data" / "domain_heldout.jsonl", "tokenizer": tokenizer, "hf": root / "hf"}


def test_batched_generation_equals_one_at_a_time_and_stops_at_eos():
    hf = tiny_hf_config()
    model = tiny_hf_model(hf)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, hf["vocab_size"], (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    never = hf["vocab_size"] - 1
    alone = domain.greedy_generate(model, prompts, max_new_tokens=6, eos_id=never, pad_id=0, batch_size=1)
    assert all(len(a) == 6 for a in alone) and never not in sum(alone, [])
    assert domain.greedy_generate(model, prompts, max_new_tokens=6, eos_id=never, pad_id=0, batch_size=3) == alone
    eos = alone[0][2]  # a token the model does produce: every answer is cut before its first occurrence
    cut = domain.greedy_generate(model, prompts, max_new_tokens=6, eos_id=eos, pad_id=0, batch_size=4)
    assert cut == [a[:a.index(eos)] if eos in a else a for a in alone] and cut[0] == alone[0][:2]


def test_accuracy_executes_decoded_answers_on_the_examples_databases(demo, monkeypatch):
    """Generation replaced by the gold SQL for every other example: accuracy 3/6, prompts encoded as in
    training (`encode_prompt`), the answer decoded by the same tokenizer and run on databases/<db_id>."""
    from replay_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(demo["tokenizer"])
    examples = domain.read_examples(demo["data"], limit=6)
    seen = []

    def fake_generate(model, prompts, **kwargs):
        seen.extend(prompts)
        return [tok.encode(e["response"]) if i % 2 == 0 else tok.encode("not sql") for i, e in enumerate(examples)]

    monkeypatch.setattr(domain, "greedy_generate", fake_generate)
    result = domain.domain_accuracy(demo["hf"], demo["tokenizer"], demo["data"], max_new_tokens=8, limit=6)
    assert seen == [tok.encode_prompt(e["prompt"]) for e in examples]
    assert (result["domain_accuracy"], result["correct"], result["examples"]) == (0.5, 3, 6)


def test_real_generation_runs_and_errors_name_paths(demo, tmp_path):
    result = domain.domain_accuracy(demo["hf"], demo["tokenizer"], demo["data"], max_new_tokens=4, limit=3)
    assert result["examples"] == 3 and 0.0 <= result["domain_accuracy"] <= 1.0
    assert all(isinstance(p, str) for p in result["predictions"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nohf")):
        domain.domain_accuracy(tmp_path / "nohf", demo["tokenizer"], demo["data"], max_new_tokens=4)
    lone = tmp_path / "lone.jsonl"
    lone.write_text(demo["data"].read_text())
    with pytest.raises(FileNotFoundError, match="databases"):
        domain.domain_accuracy(demo["hf"], demo["tokenizer"], lone, max_new_tokens=4)
