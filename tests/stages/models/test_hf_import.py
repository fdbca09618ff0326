"""Hugging Face Llama checkpoints become lmpipe GPTs with transformers' logits (MHA, GQA, tied, untied, sharded,
bf16); import -> export -> from_pretrained gives the original logits bitwise; grouped-query attention trains,
generates with the KV cache and decodes speculatively; bad checkpoints are one-line errors naming the file."""

import json
import shutil

import pytest
import torch

from schemas.configs import ModelConfig, TargetVariant
from stages.corpus.tokenizers import train_bpe
from stages.inference.export_hf import export_llama
from stages.inference.generate import generate
from stages.inference.speculative import generate_speculative
from stages.models.gpt import GPT
from stages.models.hf_import import import_llama, load_llama_weights, read_llama_checkpoint
from stages.models.saved import load_model
from stages.objectives.factory import build_objective
from storage.checkpoints import save_model
from tests.helpers import make_token_artifact, tiny_run

GQA = ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2, d_model=32)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 0.5,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
"""Llama 3.1's scaling with a context this small that head_dim 16's frequencies fall in all three bands (wavelength
6.3 < 32/4 kept, 32.5 between 32/4 and 32/0.5 blended, the rest divided by 8)."""
CHECKPOINTS = {  # name: (num_key_value_heads, tie_word_embeddings, save_pretrained options)
    "mha_tied": (4, True, {}),
    "gqa_untied": (2, False, {}),
    "mqa_tied_sharded": (1, True, {"max_shard_size": "20KB"}),
    "gqa_untied_bf16": (2, False, {"dtype": torch.bfloat16}),
    "gqa_llama3_rope": (2, True, {"rope_parameters": LLAMA3_ROPE}),
}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    tok = train_bpe(["a tiny corpus for a tiny tokenizer, with enough words to merge."] * 8, 300)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def save_llama(directory, kv_heads: int, tie: bool, vocab_size: int = 300, dtype=None, max_shard_size=None,
               **overrides):
    """A random LlamaForCausalLM (non-default rope_theta and eps, random norm weights) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(kv_heads + 10 * tie)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=100, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                         rms_norm_eps=1e-5, max_position_embeddings=64, initializer_range=0.1,
                         **({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}} | overrides))
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_llama(root / name, kv, tie, **opts) for name, (kv, tie, opts) in CHECKPOINTS.items()}


def hf_logits(directory, idx_BT):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(idx_BT).logits


IDX = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_imported_logits_equal_transformers(checkpoints, name):
    kv_heads, tie, _ = CHECKPOINTS[name]
    model = import_llama(checkpoints[name])
    cfg = model.cfg
    assert (cfg.kv_heads, cfg.tie_embeddings, cfg.mlp_hidden, cfg.rope_theta, cfg.norm_eps) == (
        kv_heads, tie, 100, 5e5, 1e-5)
    assert model.embed.weight.dtype == torch.float32 and (model.lm_head.weight is model.embed.weight) is tie
    if name.endswith("sharded"):
        assert (checkpoints[name] / "model.safetensors.index.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), hf_logits(checkpoints[name], IDX), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["gqa_untied", "mqa_tied_sharded", "gqa_untied_bf16", "gqa_llama3_rope"])
def test_import_export_round_trip_is_exact(checkpoints, tokenizer_path, tmp_path, name):
    out = export_llama(import_llama(checkpoints[name]), tokenizer_path, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == CHECKPOINTS[name][0]
    assert torch.equal(hf_logits(out, IDX), hf_logits(checkpoints[name], IDX))


def test_llama3_rope_scaling_keeps_short_waves_divides_long_ones_and_blends_between(checkpoints):
    from stages.models.gpt import rotary_frequencies

    scaling = import_llama(checkpoints["gqa_llama3_rope"]).cfg.rope_scaling
    assert scaling is not None and scaling.model_dump() == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    plain, scaled = rotary_frequencies(16, 5e5), rotary_frequencies(16, 5e5, scaling)
    blend = (32 / (2 * torch.pi / plain[1]) - 0.5) / (4.0 - 0.5)  # 32 / wavelength between the two factors
    assert scaled[0] == plain[0] and torch.equal(scaled[2:], plain[2:] / 8)
    torch.testing.assert_close(scaled[1], blend * plain[1] + (1 - blend) * plain[1] / 8)
    assert import_llama(checkpoints["gqa_untied"]).cfg.rope_scaling is None


def test_extra_heads_start_as_copies_of_the_last_layer(checkpoints):
    model = import_llama(checkpoints["gqa_untied"], num_future_tokens=3, max_seq_len=48)
    assert model.cfg.num_layers == 5 and model.num_trunk_layers == 2 and model.max_seq_len == 48
    with torch.no_grad():
        logits, _ = model.forward_heads(IDX)
    torch.testing.assert_close(logits[0], hf_logits(checkpoints["gqa_untied"], IDX), rtol=0, atol=1e-5)
    assert all(torch.equal(logits[0], other) for other in logits[1:])  # same block on the same trunk output


def test_weights_load_into_a_model_built_elsewhere(checkpoints):
    checkpoint = read_llama_checkpoint(checkpoints["mha_tied"])
    model = GPT(checkpoint.model, checkpoint.vocab_size, 64).eval()
    load_llama_weights(model, checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), import_llama(checkpoints["mha_tied"])(IDX), rtol=0, atol=0)


def test_an_imported_model_saves_and_loads_as_an_artifact(checkpoints, tmp_path):
    model = import_llama(checkpoints["gqa_untied"], max_seq_len=40)
    save_model(tmp_path / "model", model, {})
    again = load_model(tmp_path / "model").eval()
    assert again.cfg == model.cfg and again.cfg.mlp_hidden == 100 and again.cfg.num_kv_heads == 2
    with torch.no_grad():
        assert torch.equal(again(IDX), model(IDX))


def test_new_model_fields_stay_out_of_the_json_at_their_default():
    assert {"num_kv_heads", "mlp_hidden"}.isdisjoint(ModelConfig().model_dump(mode="json"))
    assert GQA.model_dump(mode="json")["num_kv_heads"] == 2 and ModelConfig.model_validate(GQA.model_dump()) == GQA
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by model.num_kv_heads \(3\)"):
        ModelConfig(num_heads=4, num_kv_heads=3)


def test_the_flops_ledger_counts_an_imported_models_matrices(checkpoints):
    from stages.evaluation.flops import forward_flops_per_token

    model = import_llama(checkpoints["gqa_untied"], max_seq_len=40)
    cfg, spec = model.cfg, model.build_spec()
    matrices = sum(m.weight.numel() for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "_blocks." in name)
    attention = cfg.num_layers * 4 * 40 * cfg.d_model
    assert forward_flops_per_token(spec) == 2 * matrices + attention + 2 * cfg.d_model * model.vocab_size


def _one_line_error(match: str, call) -> str:
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_checkpoints_are_one_line_errors(checkpoints, tmp_path):
    from transformers import GPT2Config

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in _one_line_error("missing", lambda: import_llama(empty))
    (empty / "config.json").write_text((checkpoints["mha_tied"] / "config.json").read_text())
    assert str(empty) in _one_line_error("safe_serialization=True", lambda: import_llama(empty))

    GPT2Config(n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    _one_line_error("model_type 'gpt2' is not LlamaForCausalLM", lambda: import_llama(tmp_path / "gpt2"))

    sharded = shutil.copytree(checkpoints["mqa_tied_sharded"], tmp_path / "sharded")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert shard.name in _one_line_error("shard .* is missing", lambda: import_llama(sharded))

    other = save_llama(tmp_path / "other", 2, False, vocab_size=200)
    model = import_llama(checkpoints["gqa_untied"])
    assert "model.safetensors" in _one_line_error(r"model.embed_tokens.weight has shape \[200, 64\]",
                                                  lambda: load_llama_weights(model, other))
    for field, value, match in [("rope_parameters", {"rope_type": "llama3", "factor": 8.0},
                                 "llama3 rope scaling: low_freq_factor field required"),
                                ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "rope scaling 'yarn'"),
                                ("attention_bias", True, "attention_bias is true"),
                                ("hidden_act", "gelu", "hidden_act 'gelu'")]:
        edited = shutil.copytree(checkpoints["mha_tied"], tmp_path / f"{field}-{match[:8]}")
        config = json.loads((edited / "config.json").read_text()) | {field: value}
        (edited / "config.json").write_text(json.dumps(config))
        assert "config.json" in _one_line_error(match, lambda d=edited: import_llama(d))


def mha_twin(model: GPT) -> GPT:
    """The multi-head model computing the same function: each key/value head repeated for its query group."""
    twin = GPT(model.cfg.model_copy(update={"num_kv_heads": None}), model.vocab_size, model.max_seq_len,
               model.num_future_tokens).eval()
    group = model.cfg.num_heads // model.cfg.kv_heads
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensor = tensor.view(model.cfg.kv_heads, -1, tensor.shape[-1]).repeat_interleave(group, 0).flatten(0, 1)
        state[name] = tensor
    twin.load_state_dict(state)
    return twin


def test_grouped_query_attention_equals_its_multi_head_twin():
    torch.manual_seed(0)
    model = GPT(GQA, 50, 24).eval()
    assert model.trunk_blocks[0].attn.k_proj.weight.shape == (16, 32)
    idx_BT = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx_BT), mha_twin(model)(idx_BT), rtol=0, atol=1e-6)


def test_gqa_kv_cache_and_speculative_decoding_equal_greedy():
    torch.manual_seed(1)
    model = GPT(GQA.model_copy(update={"num_layers": 4}), 40, 24, num_future_tokens=2).eval()
    for block in model.head_blocks[1:]:  # drafts that get accepted
        block.load_state_dict(model.head_blocks[0].state_dict())
    prompt = [3, 1, 4, 1, 5]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    greedy = generate(model, prompt, 12)
    assert greedy == ids[len(prompt):]
    assert generate_speculative(model, prompt, 12)[0] == greedy
    assert generate_speculative(model, prompt, 12, draft=0)[0] == greedy


@pytest.mark.parametrize("variant", [TargetVariant(name="ntp"), TargetVariant(name="mtp2", num_future_tokens=2)],
                         ids=["ntp", "mtp2"])
def test_grouped_query_attention_trains(tmp_path, variant):
    tokens = make_token_artifact(tmp_path / "tokens")
    summary = tiny_run(tokens, tmp_path / "work", objective=build_objective(GQA, variant))
    assert summary["steps"] == 8 and torch.isfinite(torch.tensor(summary["train_loss"]))
    assert summary["val_loss"]["val"] < 4.1  # log(64) = 4.16: it learned something
