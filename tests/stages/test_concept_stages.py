"""train_sae and extract_concepts on fake tokens and a tiny random reference (CPU, seconds)."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from schemas.configs import ExtractConfig, SAEConfig
from schemas.tables import CONCEPTS, TOKEN_CONCEPTS
from stages import extract_concepts, node_builder, train_sae
from stages.dag import Node
from stages.models.saved import load_model, load_sae
from stages.models.window_losses import token_losses
from stages.runtime import interrupt
from storage.artifacts import artifact_key, build_dir, read_manifest
from storage.checkpoints import list_checkpoints
from storage.parquet import write_table
from storage.store import verify
from storage.windows import TokenWindows
from tests.helpers import SEQ_LEN, make_model, make_tokens, manifest, save_tiny_tokenizer

VOCAB = 280
SAE_CFG = SAEConfig(max_tokens=6 * 1024, batch_rows=1024, eval_every_steps=3, eval_windows=4, k=4, dead_tokens=2048,
                    device="cpu")
"""6 steps of 1024 rows; a checkpoint with the evaluation after step 3."""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    tokens = make_tokens(root, vocab_size=VOCAB)
    tokenizer = save_tiny_tokenizer(Path(tokens.path) / "tokenizer.json", VOCAB)
    import pyarrow as pa

    vocab = {"token_id": list(range(VOCAB)), "token": [tokenizer.id_to_token(i) or f"<{i}>" for i in range(VOCAB)],
             "is_special": [False] * VOCAB}
    write_table(Path(tokens.path) / "vocab.parquet", vocab,
                pa.schema([("token_id", pa.int32()), ("token", pa.string()), ("is_special", pa.bool_())]))
    reference = make_model(root, "reference", VOCAB)
    sae_out = root / "sae"
    sae_out.mkdir()
    sae_summary = train_sae.run(SAE_CFG, {"tokens": tokens, "reference": reference}, sae_out)
    sae = manifest("train_sae", sae_out, summary=sae_summary)
    cfg = ExtractConfig(num_shards=2, batch_size=4, top=3, device="cpu")
    out = root / "concepts"
    out.mkdir()
    summary = extract_concepts.run(cfg, {"tokens": tokens, "reference": reference, "sae": sae}, out)
    return tokens, reference, sae, sae_summary, cfg, out, summary


def test_sae_stage_writes_model_and_metrics(built):
    _, _, sae, summary, _, _, _ = built
    model, meta = load_sae(Path(sae.path))
    assert (meta["num_latents"], meta["k"], meta["layer"]) == (16 * 32, 4, 0)
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(16 * 32))
    names = set(pq.read_table(Path(sae.path) / "metrics.parquet")["name"].to_pylist())
    assert {"train/fvu", "train/l0", "train/dead_fraction", "eval/fvu", "eval/l0", "eval/spliced_loss_increase",
            "eval/dead_fraction"} <= names
    assert 0 <= summary["fvu"] < 1 and summary["l0"] <= 4
    assert summary["resumed_from_step"] == 0 and not (Path(sae.path) / "checkpoints").exists()


def _stop_after(step: int, error: type[BaseException] | None = None):
    """A stand-in for interrupt.requested (asked once after every SAE step): a stop request after `step`, or
    with `error` that error there instead (a crash, as far as the next build can tell a kill -9)."""
    asked = iter(range(1, 10**6))

    def requested() -> bool:
        if next(asked) == step:
            if error is not None:
                raise error("killed")
            return True
        return False

    return requested


def _assert_same_sae(whole: Path, resumed: Path) -> None:
    """Bit-identical weights and metric rows (rows/s, a timing, aside)."""
    assert (whole / "sae.safetensors").read_bytes() == (resumed / "sae.safetensors").read_bytes()
    tables = [pq.read_table(d / "metrics.parquet").to_pylist() for d in (whole, resumed)]
    assert [r for r in tables[0] if r["name"] != "train/rows_per_s"] == \
        [r for r in tables[1] if r["name"] != "train/rows_per_s"]


def test_sae_stopped_by_a_signal_checkpoints_and_resumes_to_the_same_sae(built, tmp_path, monkeypatch):
    tokens, reference, sae, _, _, _, _ = built
    inputs = {"tokens": tokens, "reference": reference}
    monkeypatch.setattr(interrupt, "requested", _stop_after(4))
    with pytest.raises(interrupt.Interrupted, match="saved a checkpoint at step 4/6; run the same command again"):
        train_sae.run(SAE_CFG, inputs, tmp_path)
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 4]
    assert not (tmp_path / "sae.safetensors").exists()
    monkeypatch.setattr(interrupt, "requested", lambda: False)
    assert train_sae.run(SAE_CFG, inputs, tmp_path)["resumed_from_step"] == 4
    _assert_same_sae(Path(sae.path), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_sae_killed_mid_run_resumes_from_its_last_checkpoint_to_the_same_sae(built, tmp_path, monkeypatch):
    tokens, reference, sae, _, _, _, _ = built
    inputs = {"tokens": tokens, "reference": reference}
    monkeypatch.setattr(interrupt, "requested", _stop_after(5, error=SystemExit))
    with pytest.raises(SystemExit):
        train_sae.run(SAE_CFG, inputs, tmp_path)
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [3]  # the evaluation's
    monkeypatch.setattr(interrupt, "requested", lambda: False)
    assert train_sae.run(SAE_CFG, inputs, tmp_path)["resumed_from_step"] == 3
    _assert_same_sae(Path(sae.path), tmp_path)


def test_sae_refuses_a_checkpoint_of_another_length(built, tmp_path, monkeypatch):
    tokens, reference, _, _, _, _, _ = built
    inputs = {"tokens": tokens, "reference": reference}
    monkeypatch.setattr(interrupt, "requested", _stop_after(4))
    with pytest.raises(interrupt.Interrupted):
        train_sae.run(SAE_CFG, inputs, tmp_path)
    longer = SAE_CFG.model_copy(update={"max_tokens": 12 * 1024})
    with pytest.raises(ValueError, match="cannot resume from .*written for 6 steps, not 12; delete"):
        train_sae.run(longer, inputs, tmp_path)


def test_spliced_loss_equals_clean_loss_for_a_perfect_reconstruction(built):
    tokens, reference, _, _, _, _, _ = built
    model = load_model(Path(reference.path))
    windows = TokenWindows.from_manifest(tokens, "val")
    inputs_BT, targets_BT = windows.batch(np.arange(3))
    h = model.residual_after(inputs_BT, 0)
    clean = token_losses(model, windows, np.arange(3), 8, torch.device("cpu")).mean()
    assert float(model.loss_from(h, 0, targets_BT).detach()) == pytest.approx(float(clean), rel=1e-5)


def test_labels_cover_every_target_once_and_belong_to_the_position_before_it(built):
    tokens, reference, sae_manifest, _, cfg, out, summary = built
    for split in cfg.splits:
        table = pq.read_table(sorted(out.glob(f"part-{split}-*.parquet"))).sort_by("token_index")
        assert table.schema == TOKEN_CONCEPTS
        windows = TokenWindows.from_manifest(tokens, split)
        np.testing.assert_array_equal(table["token_index"].to_numpy(), np.arange(1, len(windows) * SEQ_LEN + 1))
    # recompute window 2 of val by hand: the label row of token_index w*T + 1 + p is the hidden state at input p
    model = load_model(Path(reference.path)).requires_grad_(False)
    sae, meta = load_sae(Path(sae_manifest.path))
    windows = TokenWindows.from_manifest(tokens, "val")
    inputs_BT, targets_BT = windows.batch(np.array([2]))
    ids_NT, scores_NT, _, _ = extract_concepts.window_concepts(model, sae, inputs_BT, targets_BT, meta["layer"], 3)
    table = pq.read_table(sorted(out.glob("part-val-*.parquet"))).sort_by("token_index").to_pydict()
    rows = slice(2 * SEQ_LEN, 3 * SEQ_LEN)  # token_index 2T+1 .. 3T
    assert table["token_index"][rows][0] == 2 * SEQ_LEN + 1
    np.testing.assert_array_equal(np.array(table["concept_ids"][rows]), ids_NT.numpy())
    np.testing.assert_allclose(np.array(table["attribution"][rows]), scores_NT.numpy(), rtol=1e-5, atol=1e-7)
    assert (np.diff(np.array(table["attribution"][rows]), axis=1) <= 0).all()  # descending per token
    assert summary["rows"] == sum(len(TokenWindows.from_manifest(tokens, s)) * SEQ_LEN for s in cfg.splits)


def test_concepts_table_describes_every_latent(built):
    _, _, _, _, _, out, summary = built
    table = pq.read_table(out / "concepts.parquet")
    assert table.schema == CONCEPTS and table.num_rows == summary["num_latents"]
    rows = [r for r in table.to_pylist() if r["num_active"] > 0]
    assert rows and summary["concepts_active"] == len(rows)
    assert all(r["top_tokens"] and r["top_contexts"] and "[[" in r["top_contexts"][0] for r in rows)
    assert sum(r["num_labelled"] for r in table.to_pylist()) == 3 * pq.read_table(
        sorted(out.glob("part-train-*.parquet")))["token_index"].length()


def test_a_forced_extraction_stops_between_shards_and_keeps_the_finished_artifact(built, tmp_path, monkeypatch):
    """A forced rebuild builds its shards inside the build task (the shard tasks found the old artifact finished):
    a stop request is honoured there too, between shards, and the old artifact stays as it was."""
    tokens, reference, sae, _, _, _, _ = built
    cfg = ExtractConfig(num_shards=2, batch_size=8, top=3, device="cpu")
    inputs = {"tokens": tokens, "reference": reference, "sae": sae}
    version = extract_concepts.STAGE.code_version
    key = artifact_key("extract_concepts", version, cfg, {role: m.key for role, m in inputs.items()})
    node = Node("extract_concepts", "extract_concepts", cfg, {role: role for role in inputs}, key, version)
    root = tmp_path / "root"
    first = node_builder.build_node(node, inputs, root=root)
    work = build_dir("extract_concepts", key, root)
    monkeypatch.setattr(interrupt, "requested", lambda: any(work.glob("part-*.parquet")))  # a stop after shard 1
    with pytest.raises(interrupt.Interrupted, match="stopped before shard train-001; finished shards are kept"):
        node_builder.build_node(node, inputs, force=True, root=root)
    assert [p.name for p in work.glob("part-*.parquet")] == ["part-train-000.parquet"]
    assert read_manifest("extract_concepts", key, root) == first and not verify(first)
    monkeypatch.setattr(interrupt, "requested", lambda: False)
    again = node_builder.build_node(node, inputs, force=True, root=root)
    assert {f.path: f.sha256 for f in again.files} == {f.path: f.sha256 for f in first.files}


def test_sae_dead_fraction_and_fvu_are_reported_and_queryable(built, tmp_path):
    """A real tiny SAE's dead fraction, FVU, L0 and spliced-loss increase: in its summary (the report's SAE row),
    and in SQL through the stage's `sae_metrics` table; a seeded node (train_sae.seed1) stays out of that
    one-artifact table."""
    from storage.artifacts import materialize
    from storage.catalog import connect

    tokens, reference = built[0], built[1]
    summaries = {}

    def trained(seed: int) -> Path:
        def build(out: Path) -> None:
            summaries[seed] = train_sae.run(SAE_CFG.model_copy(update={"seed": seed}),
                                            {"tokens": tokens, "reference": reference}, out)
        return Path(materialize("train_sae", "test", SAE_CFG.model_copy(update={"seed": seed}), {}, build,
                                root=tmp_path).path)

    current = {"train_sae": trained(0), "train_sae.seed1": trained(1)}
    summary = summaries[0]
    assert 0 <= summary["dead_fraction"] <= 1 and 0 <= summary["fvu"] < 1
    assert {"l0", "spliced_loss_increase", "clean_loss", "spliced_loss"} <= set(summary)
    con = connect({"sae_metrics": train_sae.STAGE.tables["sae_metrics"]}, {}, current, root=tmp_path)
    rows = dict(con.execute("SELECT name, value FROM sae_metrics WHERE name LIKE 'eval/%' "
                            "AND step = (SELECT max(step) FROM sae_metrics)").fetchall())
    assert rows["eval/dead_fraction"] == pytest.approx(summary["dead_fraction"])
    assert rows["eval/fvu"] == pytest.approx(summary["fvu"])
    assert rows["eval/spliced_loss_increase"] == pytest.approx(summary["spliced_loss_increase"])
    (count,) = con.execute("SELECT count(*) FROM sae_metrics").fetchone()
    (every,) = con.execute("SELECT count(*) FROM sae_metrics_all").fetchone()
    assert every == 2 * count  # both artifacts are built; the current table reads train_sae's alone
