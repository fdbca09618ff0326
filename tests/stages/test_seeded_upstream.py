"""Seeded upstream models (PipelineConfig.seed_upstream, stages/seeded_upstream.py) and the attribution-rule nodes
(ConceptsConfig.attribution): which node every seed run and variant reads, and that the one-seed keys stay."""

from schemas.configs import ConceptsConfig, TargetVariant
from schemas.presets import compare, default
from stages.dag import plan


def test_seed_runs_read_their_own_reference_teacher_and_chains():
    nodes = plan(compare())
    for r in (1, 2):
        seed = f".seed{r}"
        assert nodes[f"train_target.slm{seed}"].upstream["scores"] == f"score_reference{seed}"
        assert nodes[f"score_reference{seed}"].upstream["reference"] == f"train_reference{seed}"
        assert nodes[f"train_target.kd{seed}"].upstream["teacher"] == f"train_teacher{seed}"
        assert nodes[f"train_target.cocomix{seed}"].upstream["concepts"] == f"extract_concepts{seed}"
        assert nodes[f"extract_concepts{seed}"].upstream == {
            "tokens": "tokenize_corpus", "reference": f"train_teacher{seed}", "sae": f"train_sae{seed}"}
        assert nodes[f"train_sae{seed}"].upstream["reference"] == f"train_teacher{seed}"
        assert nodes[f"train_reference{seed}"].config.train.seed == r
        assert nodes[f"train_teacher{seed}"].config.train.seed == r
        assert nodes[f"train_sae{seed}"].config.seed == r
    # run 0 reads the unseeded nodes: the default run's artifacts
    nodes0 = plan(default())
    for name in ("train_reference", "train_teacher", "score_reference", "train_sae", "extract_concepts",
                 "train_target.ntp", "train_target.slm", "train_target.cocomix", "evaluate"):
        if name != "evaluate":
            assert nodes[name].key == nodes0[name].key, name
    assert len({nodes[f"train_teacher{s}"].key for s in ("", ".seed1", ".seed2")}) == 3


def test_without_seed_upstream_every_seed_run_reads_the_same_upstream():
    cfg = compare().model_copy(update={"seed_upstream": False})
    nodes = plan(cfg)
    assert not any(name.startswith(("train_reference.", "train_teacher.", "train_sae.")) for name in nodes)
    assert nodes["train_target.slm.seed2"].upstream["scores"] == "score_reference"


def test_attribution_variants_read_their_rules_labels():
    nodes = plan(compare())
    assert nodes["train_target.cocomix_token"].upstream["concepts"] == "extract_concepts.token"
    assert nodes["train_target.cocomix_act.seed1"].upstream["concepts"] == "extract_concepts.activation.seed1"
    assert nodes["extract_concepts.token"].config.attribution == "token"
    assert nodes["extract_concepts.activation"].config.attribution == "activation"
    assert nodes["extract_concepts"].config.attribution == "window_mean"
    # a variant naming the pipeline's own rule gets a node with the same artifact key
    cfg = default()
    cfg = cfg.model_copy(update={"target": cfg.target.model_copy(update={"variants": cfg.target.variants + [
        TargetVariant(name="cocomix_mean", concepts=ConceptsConfig(attribution="window_mean"))]})})
    nodes = plan(cfg)
    assert nodes["extract_concepts.window_mean"].key == nodes["extract_concepts"].key
    assert "attribution" not in ConceptsConfig().model_dump()
