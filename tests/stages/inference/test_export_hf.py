"""Llama export round-trips through transformers; KV-cache generation matches recomputation and HF generate."""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from schemas.configs import ModelConfig
from stages.corpus.tokenizers import train_bpe
from stages.inference.export_hf import EXTRA_HEADS, export_llama
from stages.inference.generate import generate, generate_text
from stages.models.gpt import GPT
from stages.models.losses import token_loss

EOS = "<|endoftext|>"
MAX_SEQ_LEN = 64
SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a small model learns to repeat what it reads.",
    "rotary positions rotate pairs of query and key dimensions.",
]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A tiny byte-level BPE with the end-of-text special token, trained on the test sentences."""
    tok = train_bpe(SENTENCES * 4, 320)  # the project's own byte-level BPE trainer
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return Tokenizer.from_file(str(tokenizer_path))


def tiny_model(vocab_size: int, tie: bool = True, mlp: str = "swiglu", num_future_tokens: int = 1,
               num_layers: int = 2, num_heads: int = 2, num_kv_heads: int | None = None) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, d_model=32,
                      tie_embeddings=tie, mlp=mlp)
    return GPT(cfg, vocab_size=vocab_size, max_seq_len=MAX_SEQ_LEN, num_future_tokens=num_future_tokens)


def trained_model(tokenizer: Tokenizer, tie: bool, steps: int = 40) -> GPT:
    """A few dozen AdamW steps on the repeated sentences, so that greedy continuations are not trivial."""
    model = tiny_model(tokenizer.get_vocab_size(), tie=tie)
    stream = torch.tensor(tokenizer.encode(" ".join(SENTENCES * 6)).ids)
    windows_BT = stream[: (len(stream) - 1) // 33 * 33 + 1].unfold(0, 33, 32)[:, :33]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = token_loss(model(windows_BT[:, :-1]), windows_BT[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 3.0, "the tiny model should have started to fit the sentences"
    return model.eval()


def greedy_without_cache(model: GPT, prompt_ids: list[int], n: int) -> list[int]:
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids):]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_loads_as_llama_and_matches(tmp_path, tokenizer_path, tokenizer, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = trained_model(tokenizer, tie)
    out = export_llama(model, tokenizer_path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is tie
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == tokenizer.get_vocab_size()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is (not tie)
        assert "model.layers.1.mlp.gate_proj.weight" in f.keys()
    assert (out / "README.md").exists() and (out / "generation_config.json").exists()

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, LlamaForCausalLM)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = SENTENCES[1] + EOS + " the lazy fox"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tok.eos_token_id == tokenizer.token_to_id(EOS)

    idx_BT = torch.randint(0, model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(idx_BT).logits - model(idx_BT)).abs().max().item()
    assert diff <= 1e-4

    prompt = tokenizer.encode("the quick").ids
    eos_id = tokenizer.token_to_id(EOS)
    ours = generate(model, prompt, 20, eos_id=eos_id)
    hf_out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=20, eos_token_id=eos_id, pad_token_id=eos_id)
    assert ours == hf_out[0, len(prompt):].tolist()
    assert len(set(ours)) > 3, "greedy output should be a non-trivial continuation"


def test_multi_token_heads_are_saved_beside_the_llama(tmp_path, tokenizer_path, tokenizer, caplog):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = tiny_model(tokenizer.get_vocab_size(), num_future_tokens=3, num_layers=4).eval()
    with caplog.at_level(logging.WARNING, logger="stages.inference.export_hf"):
        out = export_llama(model, tokenizer_path, tmp_path / "hf")
    assert "multi-token" in caplog.text and EXTRA_HEADS in caplog.text
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.num_hidden_layers == 2  # one trunk block + head 0
    idx_BT = torch.randint(0, model.vocab_size, (1, 16))
    with torch.no_grad():
        assert (hf(idx_BT).logits - model(idx_BT)).abs().max().item() <= 1e-4
    # the documented recipe: an extra head is a Llama layer on the hidden state entering the last layer
    extra = load_file(out / EXTRA_HEADS)
    assert {k.split(".")[1] for k in extra} == {"0", "1"}
    with torch.no_grad():
        hidden = hf(idx_BT, output_hidden_states=True).hidden_states[-2]
        position_ids = torch.arange(16)[None]
        rotary = hf.model.rotary_emb(hidden, position_ids)
        ours, _ = model.forward_heads(idx_BT)
        for j in range(2):
            layer = LlamaDecoderLayer(hf.config, layer_idx=0).eval()
            prefix = f"extra_heads.{j}."
            layer.load_state_dict({k.removeprefix(prefix): v for k, v in extra.items() if k.startswith(prefix)})
            mask = torch.full((16, 16), float("-inf")).triu(1)[None, None]
            out_h = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
            out_h = out_h[0] if isinstance(out_h, tuple) else out_h
            logits = hf.lm_head(hf.model.norm(out_h))
            assert (logits - ours[j + 1]).abs().max().item() <= 1e-4


def test_grouped_query_export_loads_as_llama_and_matches(tmp_path, tokenizer_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = tiny_model(tokenizer.get_vocab_size(), tie=False, num_heads=4, num_kv_heads=2).eval()
    out = export_llama(model, tokenizer_path, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.num_key_value_heads == 2 and hf.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)
    idx_BT = torch.randint(0, model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(idx_BT).logits - model(idx_BT)).abs().max().item() <= 1e-5
    prompt = tokenizer.encode("the quick").ids
    hf_out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=12, pad_token_id=0)
    assert generate(model, prompt, 12) == hf_out[0, len(prompt):].tolist()


def test_gelu_export_raises(tmp_path, tokenizer_path, tokenizer):
    with pytest.raises(ValueError, match="GELU"):
        export_llama(tiny_model(tokenizer.get_vocab_size(), mlp="gelu"), tokenizer_path, tmp_path / "hf")


def test_kv_cache_generation_equals_recomputation(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size()).eval()
    prompt = tokenizer.encode(SENTENCES[0]).ids
    assert generate(model, prompt, 20) == greedy_without_cache(model, prompt, 20)


def test_sampling_is_repeatable_per_seed(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    prompt = tokenizer.encode("a small").ids
    first = generate(model, prompt, 20, temperature=1.0, top_k=50, seed=3)
    assert first == generate(model, prompt, 20, temperature=1.0, top_k=50, seed=3)
    assert first != generate(model, prompt, 20, temperature=1.0, top_k=50, seed=4)
    assert len(generate(model, prompt, 20, temperature=0.7, top_k=1, seed=5)) == 20
    assert generate(model, prompt, 20, temperature=1e-3, top_k=1) == generate(model, prompt, 20)


def test_long_prompt_is_truncated_from_the_left_and_eos_stops(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    long_prompt = (tokenizer.encode(" ".join(SENTENCES)).ids * 4)[:100]
    new = generate(model, long_prompt, 10)
    assert new == generate(model, long_prompt[-(MAX_SEQ_LEN - 10):], 10)
    first = new[0]
    assert generate(model, long_prompt, 10, eos_id=first) == [first]
    assert isinstance(generate_text(model, tokenizer, "the quick", 5), str)
