"""Complete HF exports: a TP2xPP2 checkpoint exported (sharded, bitwise the HF weights it came from) and loaded by transformers from the directory
alone with the Megatron model's logits (1e-5) and a chat-templated generation; the sentencepiece tokenizer
exported with the same ids; the streaming export's peak RSS against the largest tensor."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_fixtures import random_tokens, tiny_hf_config, tiny_hf_model
from replay_megatron.data.tokenizer import SentencePieceTokenizer, load_tokenizer, train_sentencepiece
from replay_megatron.data.tokenizer_export import export_tokenizer
from replay_megatron.models.safetensors_stream import INDEX_FILE
from replay_megatron.training.export import export_hf

CORPUS = [f"Q{a}: what is {a} + {b}?  A: {a + b}.\tSELECT name FROM t{b} WHERE x = 'é{a}'"
          for a in range(0, 200, 7) for b in range(3, 60, 11)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp") / "t.model", vocab_size=480)


@pytest.fixture(scope="module")
def exported_tokenizer(sp_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    ids = export_tokenizer(sp_model, out)
    return out, ids


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)), max_size=40))
def test_sentencepiece_export_encodes_any_text_to_the_same_ids(sp_model, exported_tokenizer, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported_tokenizer[0])
    sp = SentencePieceTokenizer(sp_model)
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)


@pytest.mark.parametrize("prompt,response", [("what is 3 + 4?", "7."), ("  SELECT\tname", " FROM t3\n")])
def test_sentencepiece_export_renders_the_training_template(sp_model, exported_tokenizer, prompt, response):
    sp, hf = SentencePieceTokenizer(sp_model), load_tokenizer(exported_tokenizer[0])
    assert hf.encode_prompt(prompt) == sp.encode_prompt(prompt)
    turn = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    assert hf.encode_chat(turn) == sp.encode_chat(turn)
    assert exported_tokenizer[1] == {"bos_token_id": sp.bos_id, "eos_token_id": sp.eos_id, "pad_token_id": sp.pad_id}


@pytest.mark.multiproc
def test_tp2_pp2_checkpoint_exports_a_directory_transformers_loads_alone(tmp_path, sp_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from replay_megatron.cli.verify_conversion import megatron_logits
    from replay_megatron.models.checkpoint import convert_hf_to_megatron
    from replay_megatron.platform.spawn import run_local

    hf = tiny_hf_config("qwen3-tiny-untied")
    tiny_hf_model(hf).save_pretrained(tmp_path / "hf")
    convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mcore"), tp=2, pp=2)
    out = export_hf(tmp_path / "mcore", tmp_path / "export", sp_model, max_shard_bytes=200_000, progress=False)
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1 and not list(tmp_path.glob(".export*"))
    before = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(index["weight_map"]) == sorted(before)  # lm_head included: untied
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(out / file)[name], before[name]), name

    tokens = random_tokens(hf, batch=2, seq=16)
    expected = run_local(megatron_logits, 1, str(tmp_path / "hf"), str(tmp_path / "mcore"), tokens, 1, 1, "cpu")[0][0]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(tokens).logits
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() < 1e-5

    sp, tok = SentencePieceTokenizer(sp_model), AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "what is 3 + 4?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    assert prompt["input_ids"][0].tolist() == sp.encode_prompt("what is 3 + 4?")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert (model.generation_config.eos_token_id, model.config.pad_token_id) == (sp.eos_id, sp.pad_id)


@pytest.mark.multiproc
def test_streaming_export_peak_rss_stays_under_one_and_a_half_largest_tensors(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_export_memory import export_memory

    result = export_memory(tmp_path, vocab=1 << 18, max_shard_bytes=40 * 2 ** 20)  # a 64 MiB embedding
    assert 0.9 < result["ratio"] < 1.5, result
    assert INDEX_FILE in result["files"] and "model-00002-of-00002.safetensors" in result["files"]
