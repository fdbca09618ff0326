"""Bring your own model, the model side: frozen Hugging Face models behind the GPT methods (GPT-2, Qwen2),
pretrained SAEs in the sae-lens and sparsify layouts, a checkpoint's tokenizer, and the Llama round trip
import -> train 0 steps -> export -> from_pretrained."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from schemas.configs import PipelineConfig, ReferenceConfig, SAEConfig, ScoreConfig, TrainConfig
from schemas.presets import tiny
from stages import score_reference, train_reference
from stages.byom import resolve
from stages.corpus.tokenizers import EOT, load_tokenizer_file
from stages.evaluation.flops import forward_flops_per_token
from stages.models.hf_adapter import HFModel
from stages.models.sae import TopKSAE
from stages.models.sae_layouts import load_pretrained_sae, read_sae_folder, save_sae_lens
from stages.models.saved import load_model
from storage.checkpoints import read_model_meta
from tests.byom_checkpoints import (
    gpt2_checkpoint,
    llama_checkpoint,
    qwen2_checkpoint,
    sae_lens_folder,
    sae_tensors,
    sparsify_folder,
)
from tests.helpers import SEQ_LEN, make_tokens, manifest

TRAIN0 = TrainConfig(max_tokens=0, batch_size_tokens=128, micro_batch_size=8, device="cpu", eval_max_windows=4)


def _frozen(tmp_path: Path, checkpoint: Path, tokens) -> tuple[HFModel, object]:
    out = tmp_path / "reference"
    out.mkdir()
    summary = train_reference.run(ReferenceConfig(init_from=str(checkpoint), train=TRAIN0), {"tokens": tokens}, out)
    assert summary["steps"] == 0 and set(summary["val_loss"]) == {"ref_val", "val"}
    return load_model(out), manifest("train_reference", out)


def _windows(tokens, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    stream = torch.from_numpy(np.load(Path(tokens.path) / f"stream-{split}.npy").astype(np.int64))
    n = (len(stream) - 1) // SEQ_LEN
    inputs = stream[: n * SEQ_LEN].view(n, SEQ_LEN)
    targets = stream[1: n * SEQ_LEN + 1].view(n, SEQ_LEN)
    return inputs, targets


@pytest.mark.parametrize("build", [gpt2_checkpoint, qwen2_checkpoint], ids=["gpt2", "qwen2"])
def test_reference_scores_of_a_frozen_model_are_its_own_per_token_loss(tmp_path, build):
    from transformers import AutoModelForCausalLM

    checkpoint, tokens = build(tmp_path / "ckpt"), make_tokens(tmp_path)
    model, reference = _frozen(tmp_path, checkpoint, tokens)
    assert isinstance(model, HFModel) and (Path(reference.path) / "hf" / "config.json").is_file()
    out = tmp_path / "scores"
    out.mkdir()
    score_reference.run(ScoreConfig(batch_size=4, num_shards=1, device="cpu"),
                        {"tokens": tokens, "reference": reference}, out)
    import pyarrow.parquet as pq

    scored = pq.read_table(out / "part-val-000.parquet").to_pandas()
    hf = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    inputs, targets = _windows(tokens, "val")
    with torch.no_grad():
        loss = F.cross_entropy(hf(inputs).logits.flatten(0, 1), targets.flatten(), reduction="none")
    np.testing.assert_allclose(scored["ref_loss"].to_numpy(), loss.numpy(), atol=1e-6)
    spec = read_model_meta(Path(reference.path))  # the compute ledger reads the frozen model's shape too
    assert spec["format"] == "hf" and forward_flops_per_token(spec) > 0


@pytest.mark.parametrize("build", [gpt2_checkpoint, qwen2_checkpoint], ids=["gpt2", "qwen2"])
def test_residual_after_a_layer_and_the_loss_from_it(tmp_path, build):
    from transformers import AutoModelForCausalLM

    checkpoint, tokens = build(tmp_path / "ckpt"), make_tokens(tmp_path)
    model, _ = _frozen(tmp_path, checkpoint, tokens)
    hf = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    inputs, targets = (t[:3] for t in _windows(tokens, "train"))
    with torch.no_grad():
        out = hf(inputs, output_hidden_states=True)
    full_loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    assert torch.equal(model.residual_after(inputs, 0), out.hidden_states[1])  # [L] is after the final norm
    for layer in range(model.cfg.num_layers):
        h = model.residual_after(inputs, layer).requires_grad_(True)
        loss = model.loss_from(h, layer, targets)
        torch.testing.assert_close(loss, full_loss, rtol=0, atol=1e-6)
        (grad,) = torch.autograd.grad(loss, h)  # attribution: d loss / d residual at the layer
        assert grad.abs().sum() > 0


def _sae_outputs(sae: TopKSAE, h: torch.Tensor):
    xn, mu, std = sae.normalize(h)
    out = sae(xn)
    return out.vals_NK.sort(-1).values, out.xhat_ND * std + mu


def test_an_sae_saved_in_the_sae_lens_layout_gives_the_same_activations(tmp_path):
    sae = TopKSAE(32, 64, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.latent_bias.normal_(0, 0.1)
        sae.pre_bias.normal_(0, 0.1)
    save_sae_lens(tmp_path / "sae", sae, layer=1)
    assert read_sae_folder(tmp_path / "sae").layer == 1
    back = load_pretrained_sae(tmp_path / "sae", layer_norm_model=False)
    h = torch.randn(20, 32)
    for ours, theirs in zip(_sae_outputs(sae, h), _sae_outputs(back, h), strict=True):
        torch.testing.assert_close(ours, theirs)


def _sae_lens_forward(t: dict, x: torch.Tensor, k: int | None, apply_b_dec: bool) -> torch.Tensor:
    """sae-lens' own recipe, written out: the reconstruction of raw residual rows."""
    pre = (x - t["b_dec"] * apply_b_dec) @ t["W_enc"] + t["b_enc"]
    if k is not None:
        values, idx = pre.topk(k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, idx, values.relu())
    else:
        acts = pre.relu()
    return acts @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("k, apply_b_dec, legacy", [(8, True, False), (8, False, True), (None, True, False)],
                         ids=["topk", "topk-pre6-no-bdec", "relu"])
def test_sae_lens_folders_import_exactly(tmp_path, k, apply_b_dec, legacy):
    t = sae_tensors()
    folder = sae_lens_folder(tmp_path / "sae", t, hook="blocks.2.hook_resid_pre", k=k,
                             apply_b_dec_to_input=apply_b_dec, legacy=legacy)
    sae = load_pretrained_sae(folder, k=64 if k is None else None, layer_norm_model=False)
    assert read_sae_folder(folder).layer == 1 and sae.input_norm == "none"
    x = torch.randn(10, 32)
    _, xhat = _sae_outputs(sae, x)
    torch.testing.assert_close(xhat, _sae_lens_forward(t, x, k, apply_b_dec), atol=1e-5, rtol=1e-5)


def test_a_gpt2_sae_of_transformer_lens_reads_the_centred_residual(tmp_path):
    t = sae_tensors()
    sae = load_pretrained_sae(sae_lens_folder(tmp_path / "sae", t), layer_norm_model=True)
    x = torch.randn(10, 32)
    mu = x.mean(-1, keepdim=True)
    _, xhat = _sae_outputs(sae, x)
    torch.testing.assert_close(xhat, _sae_lens_forward(t, x - mu, 8, True) + mu, atol=1e-5, rtol=1e-5)


def test_sparsify_folders_import_exactly(tmp_path):
    t = sae_tensors()
    folder = sparsify_folder(tmp_path, t, layer=1)
    sae = load_pretrained_sae(folder)
    assert read_sae_folder(folder).layer == 1 and sae.input_norm == "none"
    x = torch.randn(10, 32)
    _, xhat = _sae_outputs(sae, x)
    torch.testing.assert_close(xhat, _sae_lens_forward(t, x, 8, True), atol=1e-5, rtol=1e-5)


def test_an_imported_sae_is_evaluated_on_the_corpus_not_trained(tmp_path):
    from stages import train_sae

    tokens = make_tokens(tmp_path)
    _, teacher = _frozen(tmp_path, gpt2_checkpoint(tmp_path / "gpt2"), tokens)
    out = tmp_path / "sae_out"
    out.mkdir()
    folder = sae_lens_folder(tmp_path / "sae", sae_tensors(), hook="blocks.0.hook_resid_post")
    summary = train_sae.run(SAEConfig(init_from=str(folder), eval_windows=4, device="cpu"),
                            {"tokens": tokens, "reference": teacher}, out)
    assert summary["imported"] and summary["layer"] == 0 and summary["l0"] == 8
    assert {"fvu", "dead_fraction", "spliced_loss_increase", "clean_loss"} <= set(summary)
    assert json.loads((out / "sae.json").read_text())["input_norm"] == "center"  # GPT-2, TransformerLens-style


def test_a_checkpoint_tokenizer_without_endoftext_joins_documents_with_its_eos(tmp_path):
    checkpoint = llama_checkpoint(tmp_path / "llama", eos="</s>")
    tokenizer = load_tokenizer_file(checkpoint)
    original = load_tokenizer_file.__globals__["Tokenizer"].from_file(str(checkpoint / "tokenizer.json"))
    assert tokenizer.token_to_id(EOT) == original.token_to_id("</s>")
    assert tokenizer.get_vocab_size(with_added_tokens=True) == original.get_vocab_size(with_added_tokens=True)
    assert tokenizer.encode("the cat sat").ids == original.encode("the cat sat").ids


@pytest.mark.parametrize("gqa, tied", [(False, False), (True, True)], ids=["mha-untied", "gqa-tied"])
def test_llama_round_trip_import_train_zero_steps_export(tmp_path, gqa, tied):
    from transformers import AutoModelForCausalLM

    from stages.inference.export_hf import export_llama

    checkpoint, tokens = llama_checkpoint(tmp_path / "llama", gqa=gqa, tied=tied), make_tokens(tmp_path)
    data = tiny().model_dump(mode="json")
    data["tokenize"]["seq_len"] = SEQ_LEN
    data["reference"] = {"init_from": str(checkpoint), "train": TRAIN0.model_dump()}
    cfg = resolve(PipelineConfig.model_validate(data)).reference
    assert cfg.model.num_kv_heads == (2 if gqa else None) and cfg.model.tie_embeddings == tied
    out = tmp_path / "reference"
    out.mkdir()
    train_reference.run(cfg, {"tokens": tokens}, out)
    exported = export_llama(load_model(out), checkpoint / "tokenizer.json", tmp_path / "export")
    original = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    inputs, _ = _windows(tokens, "val")
    with torch.no_grad():
        assert torch.equal(back(inputs).logits, original(inputs).logits)
