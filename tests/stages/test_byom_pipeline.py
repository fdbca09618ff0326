"""Bring your own model, the pipeline side: roles from checkpoint folders in the plan (shapes, digests in the keys),
the checks that run before a run (one-line errors naming the file and the fix), the two presets, and a tiny build
end to end with a frozen GPT-2 reference and teacher, an imported SAE and targets continuing from a Llama."""

import json
from pathlib import Path

import pytest
import torch

from schemas.configs import PipelineConfig
from schemas.loading import load_config
from schemas.presets import tiny
from schemas.tables import VOCAB as VOCAB_SCHEMA
from stages import node_builder
from stages.byom import check_inputs
from stages.dag import plan
from stages.models.checkpoint_files import hashed_files
from stages.models.saved import load_model, load_sae
from storage.parquet import read_table, write_table
from tests.byom_checkpoints import VOCAB, gpt2_checkpoint, llama_checkpoint, sae_lens_folder, sae_tensors
from tests.helpers import SEQ_LEN, make_tokens

TRAIN = {"max_tokens": 256, "batch_size_tokens": 128, "micro_batch_size": 8, "device": "cpu", "eval_every_steps": 1,
         "eval_max_windows": 4, "warmup_steps": 1}
SLM = {"name": "slm", "selection": {"kind": "top_k", "score": "excess_loss", "keep_ratio": 0.6}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("byom")
    return {"llama": llama_checkpoint(root / "llama", gqa=True), "gpt2": gpt2_checkpoint(root / "gpt2"),
            "sae": sae_lens_folder(root / "sae", sae_tensors(), hook="blocks.1.hook_resid_pre")}


def config(folders: dict, *, variants=({"name": "ntp"}, SLM), **sections) -> PipelineConfig:
    """tiny with a frozen GPT-2 reference and teacher, the SAE folder, Llama targets (sections override)."""
    data = tiny().model_dump(mode="json")
    frozen = {"init_from": str(folders["gpt2"]), "train": TRAIN | {"max_tokens": 0}}
    data |= {"reference": frozen, "teacher": frozen, "score": {"batch_size": 8, "num_shards": 1, "device": "cpu"},
             "sae": {"init_from": str(folders["sae"]), "eval_windows": 4, "device": "cpu"},
             "concepts": {"num_shards": 1, "batch_size": 8, "device": "cpu"},
             "dashboards": {"batch_size": 8, "device": "cpu", "max_tokens": 256},
             "target": {"init_from": str(folders["llama"]), "train": TRAIN, "variants": list(variants)}}
    data["tokenize"] |= {"seq_len": SEQ_LEN, "tokenizer": "model"}
    data["evaluate"]["baseline"] = "ntp"
    for section, value in sections.items():
        data[section] = data.get(section, {}) | value
    return PipelineConfig.model_validate(data)


def test_the_plan_takes_shapes_and_digests_from_the_folders(folders):
    nodes = plan(config(folders, variants=[{"name": "ntp"}, {"name": "mtp2", "num_future_tokens": 2}]))
    target = nodes["train_target.mtp2"].config
    assert (target.model.num_layers, target.model.num_kv_heads, target.model.mlp_hidden) == (2, 2, 56)
    assert len(target.init_digest) == 64 and nodes["train_reference"].config.init_digest != target.init_digest
    assert nodes["tokenize_corpus"].config.tokenizer_path == str(folders["gpt2"])  # the first role with one
    assert nodes["tokenize_corpus"].config.tokenizer_digest


def test_a_changed_file_changes_the_keys_downstream_and_an_unchanged_one_is_hashed_once(folders, tmp_path):
    import shutil

    llama = Path(shutil.copytree(folders["llama"], tmp_path / "llama"))
    cfg = config(folders | {"llama": llama})
    before = {name: node.key for name, node in plan(cfg).items()}
    hashed = hashed_files()
    assert {name: node.key for name, node in plan(cfg).items()} == before and hashed_files() == hashed
    config_json = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps(config_json | {"note": "edited"}))
    after = {name: node.key for name, node in plan(cfg).items()}
    changed = {name for name in before if after[name] != before[name]}
    assert changed == {"train_target.ntp", "train_target.slm", "evaluate"}


def _one_line(cfg, match: str) -> str:
    with pytest.raises(ValueError, match=match) as err:
        check_inputs(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_inputs_are_one_line_errors_naming_the_file_and_the_fix(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in _one_line(config(folders, target={"init_from": str(empty)}), "save_pretrained")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folders["llama"] / "config.json").read_text())
    _one_line(config(folders, target={"init_from": str(no_weights)}), "no model.safetensors")
    _one_line(config(folders, target={"init_from": str(folders["gpt2"])}), "only Llama-family checkpoints are trained")
    _one_line(config(folders, reference={"train": TRAIN}), "GPT2LMHeadModel.*max_tokens=0")
    message = _one_line(config(folders, target={"model": {"num_layers": 3}}), "target.model.num_layers=3")
    assert "has 2" in message and "config.json" in message
    _one_line(config(folders, tokenize={"tokenizer": "gpt2"}), f"50257 ids but .* has {VOCAB} rows")
    _one_line(config(folders, tokenize={"tokenizer": "bpe"}), "tokenize.tokenizer=model")
    narrow = sae_lens_folder(tmp_path / "narrow", sae_tensors(d_in=16))
    _one_line(config(folders, sae={"init_from": str(narrow)}), "d_in=16 but the teacher's residual stream has 32")
    _one_line(config(folders, sae={"layer": 1}), "after block 0, sae.layer is 1")


def test_a_sharded_checkpoint_with_a_missing_shard(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(folders["llama"])).save_pretrained(sharded, max_shard_size="20KB")
    (sharded / "tokenizer.json").write_text((folders["llama"] / "tokenizer.json").read_text())
    check_inputs(config(folders, target={"init_from": str(sharded)}))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (sharded / shard).unlink()
    _one_line(config(folders, target={"init_from": str(sharded)}), f"{shard}: shard listed .* is missing")


def test_presets_name_the_set_to_give_and_plan_with_tiny_folders(folders, tmp_path):
    with pytest.raises(ValueError, match=r"--set base.init_from="):
        check_inputs(load_config("continual_hf"))
    cfg = load_config("continual_hf", overrides=[f"base.init_from={folders['llama']}"])
    check_inputs(cfg)
    nodes = plan(cfg)
    assert nodes["train_target.ntp"].config.model == nodes["train_base"].config.model
    assert nodes["train_target.ntp"].upstream["init"] == "train_base"
    assert nodes["train_base"].config.train.max_tokens == 0
    with pytest.raises(ValueError, match=r"--set teacher.init_from="):
        check_inputs(load_config("cocomix_gpt2"))
    with pytest.raises(ValueError, match=r"--set sae.init_from="):
        check_inputs(load_config("cocomix_gpt2", overrides=[f"teacher.init_from={folders['gpt2']}"]))
    gpt2 = gpt2_checkpoint(tmp_path / "gpt2", vocab=None)  # the students' vocabulary: KD needs the same logits
    cfg = load_config("cocomix_gpt2", overrides=[f"teacher.init_from={gpt2}",
                                                 f"sae.init_from={folders['sae']}", "tokenize.tokenizer=model",
                                                 "tokenize.seq_len=32"])
    check_inputs(cfg)
    assert {"train_teacher", "train_sae", "extract_concepts", "train_target.cocomix"} <= set(plan(cfg))


def _fake_tokens(tmp_path: Path, folders: dict):
    tokens = make_tokens(tmp_path)
    write_table(Path(tokens.path) / "vocab.parquet", {"token_id": list(range(VOCAB)),
                                                      "token": [f"t{i}" for i in range(VOCAB)],
                                                      "is_special": [False] * VOCAB}, VOCAB_SCHEMA)
    (Path(tokens.path) / "tokenizer.json").write_text((folders["llama"] / "tokenizer.json").read_text())
    return tokens


def test_a_tiny_pipeline_from_a_frozen_gpt2_an_imported_sae_and_llama_targets(folders, tmp_path):
    variants = [{"name": "ntp"}, SLM, {"name": "cocomix", "concepts": {}}, {"name": "kd", "distill": {}},
                {"name": "mtp2", "num_future_tokens": 2}]
    nodes, root = plan(config(folders, variants=variants)), tmp_path / "root"
    built = {"tokenize_corpus": _fake_tokens(tmp_path, folders)}  # a fake tokens artifact stands in for the corpus
    for name, node in nodes.items():
        if name not in built and name != "evaluate":
            built[name] = node_builder.build_node(node, {role: built[up] for role, up in node.upstream.items()},
                                                  root=root)
    sae = built["train_sae"].summary
    assert sae["imported"] and sae["layer"] == 0 and sae["l0"] == 8 and 0 <= sae["dead_fraction"] <= 1
    assert load_sae(Path(built["train_sae"].path))[0].input_norm == "center"
    assert built["score_reference"].summary["num_rows"]["train"] > 0
    assert built["extract_concepts"].summary["rows"] > 0
    mtp2 = load_model(Path(built["train_target.mtp2"].path))
    assert mtp2.num_future_tokens == 2 and mtp2.cfg.num_layers == 3  # the checkpoint's 2 layers + 1 head
    first = {name: read_table(Path(built[f"train_target.{name}"].path) / "metrics.parquet").to_pandas()
             .query("step == 0 and name == 'val/val/loss'")["value"].item() for name in ("ntp", "slm", "mtp2")}
    assert first["ntp"] == first["slm"] == pytest.approx(first["mtp2"], abs=1e-6)  # all start from the checkpoint
    assert all(built[f"train_target.{v['name']}"].summary["steps"] == 2 for v in variants)
    assert torch.isfinite(torch.tensor(built["train_target.kd"].summary["train_loss"]))
    _exports_give_back_what_was_imported(built, folders, tmp_path)


def _exports_give_back_what_was_imported(built: dict, folders: dict, tmp_path: Path) -> None:
    """`lmpipe export` of a frozen role: the checkpoint's own files; of the SAE: the sae-lens layout."""
    from flows.model_commands import export_kept
    from stages.models.sae_layouts import load_pretrained_sae, read_sae_folder

    out = export_kept(built["train_reference"], tmp_path / "export-reference")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).read_bytes() == (folders["gpt2"] / name).read_bytes(), name
    assert export_kept(built["train_target.ntp"], tmp_path / "export-ntp") is None  # a GPT: exported as Llama
    sae_dir = export_kept(built["train_sae"], tmp_path / "export-sae")
    assert read_sae_folder(sae_dir).layer == 0
    ours, back = load_sae(Path(built["train_sae"].path))[0], load_pretrained_sae(sae_dir, layer_norm_model=True)
    assert back.input_norm == ours.input_norm == "center"
    for name, param in ours.named_parameters():
        assert torch.equal(param, back.get_parameter(name)), name


@pytest.mark.slow
def test_a_tiny_run_tokenizes_with_the_checkpoint_tokenizer_and_evaluates(folders, tmp_path):
    """The whole DAG on the tiny corpus (tokenize_corpus with the GPT-2 folder's tokenizer, evaluate included)."""
    from tokenizers import Tokenizer

    cfg = config(folders, variants=[{"name": "ntp"}, SLM, {"name": "mtp2", "num_future_tokens": 2}],
                 evaluate={"max_windows": 8, "speculative_prompts": 2, "speculative_new_tokens": 8})
    check_inputs(cfg)
    built, root = {}, tmp_path / "root"
    for name, node in plan(cfg).items():
        built[name] = node_builder.build_node(node, {role: built[up] for role, up in node.upstream.items()}, root=root)
    eos = Tokenizer.from_file(str(folders["gpt2"] / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert built["tokenize_corpus"].summary["eot_id"] == eos
    report = (Path(built["evaluate"].path) / "report.md").read_text()
    assert "| reference |" in report and "| mtp2 |" in report
