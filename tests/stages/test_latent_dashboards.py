"""latent_dashboards: the running top-N by hand, and the stage on fake tokens, a tiny reference and a random SAE
(CPU, seconds), checked against a direct encoding of every window."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from schemas.configs import LatentDashboardConfig
from schemas.presets import tiny
from stages import latent_dashboards
from stages.latent_dashboards import TopActivations
from stages.models.sae import TopKSAE
from stages.models.saved import load_model, save_sae
from storage.windows import TokenWindows
from tests.helpers import SEQ_LEN, make_model, make_tokens, manifest, save_tiny_tokenizer

VOCAB = 280


def test_top_activations_keeps_the_n_highest_per_latent_earlier_position_first_on_ties():
    top = TopActivations(num_latents=3, n=2)
    top.add(np.array([0, 0, 1, 0]), np.array([0.5, 0.9, 0.2, 0.5], np.float32), np.array([10, 11, 12, 13]))
    top.add(np.array([0, 1, 1]), np.array([0.6, 0.1, 0.3], np.float32), np.array([20, 21, 22]))
    assert top.ranked() == [(0, 1, pytest.approx(0.9), 11), (0, 2, pytest.approx(0.6), 20),
                            (1, 1, pytest.approx(0.3), 22), (1, 2, pytest.approx(0.2), 12)]
    assert top.count.tolist() == [4, 3, 0]  # latent 2 never fired: dead
    assert top.total.tolist() == pytest.approx([2.5, 0.6, 0.0])
    top.add(np.array([0]), np.array([0.5], np.float32), np.array([1]))  # below latent 0's floor: not kept
    assert [r[3] for r in top.ranked() if r[0] == 0] == [11, 20]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboards")
    tokens = make_tokens(root, vocab_size=VOCAB)
    save_tiny_tokenizer(Path(tokens.path) / "tokenizer.json", VOCAB)
    reference = make_model(root, "reference", VOCAB)
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))
    (root / "sae").mkdir()
    save_sae(root / "sae", sae, {"layer": 0, "reference_key": "r"})
    cfg = LatentDashboardConfig(contexts_per_latent=3, context_tokens=2, logit_tokens=4, batch_size=5, device="cpu")
    out = root / "out"
    out.mkdir()
    summary = latent_dashboards.run(cfg, {"tokens": tokens, "reference": reference,
                                          "sae": manifest("train_sae", root / "sae")}, out)
    return tokens, reference, sae, cfg, out, summary


def encode_all(tokens, reference, sae):
    """Every input position's SAE activations as a dense (positions, latents) array."""
    windows = TokenWindows.from_manifest(tokens, "train")
    model = load_model(Path(reference.path))
    vals, idx = latent_dashboards.encode_windows(model, sae, windows, np.arange(len(windows)), 0, "cpu")
    dense = np.zeros((len(vals), sae.W_dec.shape[0]), np.float32)
    np.put_along_axis(dense, idx, vals, axis=1)
    return windows, model, dense


def test_density_and_peaks_match_a_direct_encoding(built):
    tokens, reference, sae, cfg, out, summary = built
    windows, _, dense = encode_all(tokens, reference, sae)
    latents = pq.read_table(out / "latents.parquet").to_pandas()
    assert summary["num_tokens"] == len(dense) == len(windows) * SEQ_LEN
    np.testing.assert_array_equal(latents["num_active"], (dense > 0).sum(0))
    np.testing.assert_allclose(latents["density"], (dense > 0).mean(0))
    np.testing.assert_allclose(latents["max_activation"], dense.max(0), rtol=1e-5)
    assert latents["dead"].tolist() == (dense.max(0) == 0).tolist()
    contexts = pq.read_table(out / "contexts.parquet").to_pandas()
    for latent in latents["concept_id"][~latents["dead"]][:10]:
        mine = contexts[contexts.concept_id == latent].sort_values("rank")
        expected = np.argsort(-dense[:, latent], kind="stable")[:min(3, int((dense[:, latent] > 0).sum()))]
        assert mine["token_index"].tolist() == expected.tolist()
        for row in mine.itertuples():  # the context: the peak's window, 2 tokens each side, activations per token
            ids = np.asarray(windows.stream[row.start_index: row.start_index + len(row.token_ids)])
            assert row.token_ids.tolist() == ids.tolist()
            assert row.start_index // SEQ_LEN == row.token_index // SEQ_LEN
            np.testing.assert_allclose(row.activations, dense[row.start_index: row.start_index + len(ids), latent],
                                       rtol=1e-5)
            assert max(row.activations) == pytest.approx(row.activation)


def test_logit_effects_are_the_decoder_direction_through_the_unembedding(built):
    tokens, reference, sae, cfg, out, _ = built
    model = load_model(Path(reference.path))
    row = pq.read_table(out / "latents.parquet").to_pylist()[7]
    logits = (sae.W_dec[7] * model.norm.weight) @ model.lm_head.weight.T
    assert row["promoted_ids"] == logits.topk(4).indices.tolist()
    assert row["suppressed_ids"] == logits.topk(4, largest=False).indices.tolist()


def test_planned_only_when_a_variant_reads_concepts():
    cfg = tiny()
    assert [d.name for d in latent_dashboards.nodes(cfg)] == ["latent_dashboards"]
    plain = cfg.model_copy(update={"target": cfg.target.model_copy(update={
        "variants": [v for v in cfg.target.variants if v.concepts is None]})})
    assert latent_dashboards.nodes(plain) == []
