"""Explicit pyarrow schemas of every Parquet table lmpipe writes.

Per-token tables are keyed by (split, token_index): the position of the token in its split's packed stream.
Window w of a split covers stream tokens [w*T, w*T + T] (T = seq_len): inputs are its first T tokens and
targets its last T, so every token with token_index >= 1 is a target exactly once, in a known context.
"""

import pyarrow as pa

SPLITS = ("train", "val", "ref_train", "ref_val")
"""train: the targets' documents; ref_train: reference-subset documents only the reference trains on (disjoint from
train); val: every held-out document; ref_val: the reference subset of val."""

DOCUMENT_BASE_FIELDS = [
    pa.field("doc_id", pa.int64(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("is_reference", pa.bool_(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("num_chars", pa.int64(), nullable=False),
    pa.field("num_tokens", pa.int64(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
]


def documents_schema(metadata_fields: list[pa.Field]) -> pa.Schema:
    """Documents table: the base fields plus the source's own metadata columns (sotu: year, president...)."""
    return pa.schema(DOCUMENT_BASE_FIELDS + list(metadata_fields))


VOCAB = pa.schema([
    pa.field("token_id", pa.int32(), nullable=False),
    pa.field("token", pa.string(), nullable=False),
    pa.field("is_special", pa.bool_(), nullable=False),
])

TOKENS = pa.schema([
    pa.field("split", pa.string(), nullable=False),
    pa.field("token_index", pa.int64(), nullable=False),
    pa.field("doc_id", pa.int64(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("token_id", pa.int32(), nullable=False),
])
"""position: index of the token inside its document (the end-of-text separator gets the position after the
last token of the document it closes)."""

TOKEN_SCORES = pa.schema([
    pa.field("split", pa.string(), nullable=False),
    pa.field("token_index", pa.int64(), nullable=False),
    pa.field("doc_id", pa.int64(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("token_id", pa.int32(), nullable=False),
    pa.field("ref_loss", pa.float32(), nullable=False),
    pa.field("ref_entropy", pa.float32(), nullable=False),
])
"""ref_loss = -log p_ref(token | its window context), nats; ref_entropy = entropy of p_ref at that position."""

METRICS = pa.schema([
    pa.field("step", pa.int64(), nullable=False),
    pa.field("tokens_seen", pa.int64(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("value", pa.float64(), nullable=False),
])

PROBE_LOSSES = pa.schema([
    pa.field("step", pa.int64(), nullable=False),
    pa.field("tokens_seen", pa.int64(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("token_index", pa.int64(), nullable=False),
    pa.field("loss", pa.float32(), nullable=False),
])

TOKEN_DYNAMICS = pa.schema([
    pa.field("variant", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("token_index", pa.int64(), nullable=False),
    pa.field("loss_start", pa.float32(), nullable=False),
    pa.field("loss_end", pa.float32(), nullable=False),
    pa.field("loss_last", pa.float32(), nullable=False),
    pa.field("delta", pa.float32(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
])
"""Least-squares line over checkpoints: loss_start = fit at first, loss_end = fit at last, delta = end - start;
loss_last = measured loss at the last checkpoint; category in H->H, L->H, H->L, L->L (Rho-1 section 2.1)."""

EVAL_LOSSES = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("num_tokens", pa.int64(), nullable=False),
    pa.field("loss", pa.float64(), nullable=False),
    pa.field("perplexity", pa.float64(), nullable=False),
])
"""Final evaluation: model = `reference` or a target variant name; split = a validation split or `file:<name>`
(an evaluate.extra_files text); loss = mean next-token loss in nats over num_tokens targets."""

COMPARISON = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("val_loss", pa.float64()),
    pa.field("val_perplexity", pa.float64()),
    pa.field("ref_val_loss", pa.float64()),
    pa.field("ref_val_perplexity", pa.float64()),
    pa.field("tokens_to_baseline_val", pa.float64()),
    pa.field("ratio_to_baseline_val", pa.float64()),
    pa.field("tokens_to_baseline_ref_val", pa.float64()),
    pa.field("ratio_to_baseline_ref_val", pa.float64()),
    pa.field("frac_h_to_h", pa.float64()),
    pa.field("frac_l_to_h", pa.float64()),
    pa.field("frac_h_to_l", pa.float64()),
    pa.field("frac_l_to_l", pa.float64()),
])
"""One row per model: final losses, tokens seen when the training-time `val/<split>/loss` first reached the
baseline variant's final value (linear interpolation between evaluations; null if never) and that number over
the baseline's own, and the token-dynamics category fractions (null without probe losses)."""

TOKEN_SELECTION = pa.schema([
    pa.field("split", pa.string(), nullable=False),
    pa.field("token_index", pa.int64(), nullable=False),
    pa.field("times_seen", pa.int32(), nullable=False),
    pa.field("times_selected", pa.int32(), nullable=False),
])
"""Per training target token of a selecting objective (Rho-1 SLM): how often it was in a batch and how often
it was among the selected top-k% (next-token head). Tokens never in a batch have no row."""

TOKEN_CONCEPTS = pa.schema([
    pa.field("split", pa.string(), nullable=False),
    pa.field("token_index", pa.int64(), nullable=False),
    pa.field("concept_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("attribution", pa.list_(pa.float32()), nullable=False),
])
"""CoCoMix labels (extract_concepts): the top-K SAE latents by attribution a_i * dL/da_i of the hidden state at
input position token_index - 1 (the one that predicts token token_index), in descending score order. Keyed
like token_scores: row token_index is the prediction made for that target."""

CONCEPTS = pa.schema([
    pa.field("concept_id", pa.int32(), nullable=False),
    pa.field("num_active", pa.int64(), nullable=False),
    pa.field("frequency", pa.float64(), nullable=False),
    pa.field("num_labelled", pa.int64(), nullable=False),
    pa.field("top_tokens", pa.list_(pa.string()), nullable=False),
    pa.field("top_contexts", pa.list_(pa.string()), nullable=False),
])
"""Per SAE latent, on the train split: times active in the SAE's top-k (and per token: frequency), times chosen
as one of the K labels, its most frequent input tokens when active ("token (count)"), and the contexts of its
highest activations (a few tokens each side, the firing token in [[...]])."""

CONCEPT_ACTIVE = pa.schema([
    pa.field("split", pa.string(), nullable=False),
    pa.field("concept_id", pa.int32(), nullable=False),
    pa.field("token_id", pa.int32(), nullable=False),
    pa.field("count", pa.int64(), nullable=False),
])
"""extract_concepts sidecar per shard: how often each latent fired on each input token."""

CONCEPT_PEAKS = pa.schema([
    pa.field("split", pa.string(), nullable=False),
    pa.field("concept_id", pa.int32(), nullable=False),
    pa.field("token_index", pa.int64(), nullable=False),
    pa.field("activation", pa.float32(), nullable=False),
])
"""extract_concepts sidecar per shard: each latent's highest activations (token_index of the firing input token)."""

COMPUTE = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("num_params", pa.int64(), nullable=False),
    pa.field("train_flops_per_token", pa.float64(), nullable=False),
    pa.field("train_flops", pa.float64()),
    pa.field("val_loss_at_baseline_flops", pa.float64()),
    pa.field("flops_to_baseline_val", pa.float64()),
    pa.field("flops_ratio_to_baseline_val", pa.float64()),
    pa.field("upstream_flops", pa.float64(), nullable=False),
    pa.field("flops_to_baseline_val_with_upstream", pa.float64()),
    pa.field("flops_ratio_with_upstream", pa.float64()),
])
"""The compute ledger (evaluate): training FLOPs per token of each target (stages/evaluation/flops.py: 3 x forward
matmul FLOPs, interleaved blocks counted twice, a distillation teacher's forward added), its total, its
training-time val loss interpolated at the baseline's mean total FLOPs, and the FLOPs it needed to reach the
baseline's mean final val loss (null if never) with the ratio to the baseline's total. upstream_flops: what the
variant's inputs cost once (the reference's training, scoring every split, the SAE and concept extraction:
whichever it depends on); the `_with_upstream` columns add it (Rho-1 Sec. 3.4 discusses both views)."""

SEED_SUMMARY = pa.schema([
    pa.field("variant", pa.string(), nullable=False),
    pa.field("metric", pa.string(), nullable=False),
    pa.field("models", pa.int32(), nullable=False),
    pa.field("runs", pa.int32(), nullable=False),
    pa.field("mean", pa.float64()),
    pa.field("std", pa.float64()),
    pa.field("min", pa.float64()),
    pa.field("max", pa.float64()),
    pa.field("diff_to_baseline", pa.float64()),
    pa.field("diff_spread", pa.float64()),
    pa.field("within_spread", pa.bool_()),
])
"""evaluate, per variant and metric over its seed runs (stages/evaluation/seeds.py): models = runs trained,
runs = runs with a value (e.g. that reached the baseline), mean, sample std, min, max; diff_to_baseline = mean -
the baseline's mean, diff_spread = sqrt(std^2 + std_baseline^2), within_spread = |diff| < diff_spread."""

SELECTION_BY_DOMAIN = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("in_reference_subset", pa.bool_(), nullable=False),
    pa.field("documents", pa.int64(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),
    pa.field("selection_rate", pa.float64()),
    pa.field("mean_ref_loss", pa.float64()),
    pa.field("mean_target_loss", pa.float64()),
    pa.field("mean_excess_loss", pa.float64()),
])
"""evaluate, per selecting target and side of the reference subset (documents.is_reference) over the `train`
split it trained on: the share of its token visits that were selected (token_selection), and on a sample of
train windows spread over the split the reference's loss, the final target's loss and their difference (the
excess loss Rho-1 ranks by). None of these documents trained the reference (tokenize.reference_share)."""

HEAD_METRICS = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("head", pa.int32(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),
    pa.field("loss", pa.float64(), nullable=False),
    pa.field("accuracy", pa.float64(), nullable=False),
])
"""evaluate, per model and validation split: head i (1-based) predicting token t+i: mean cross-entropy (nats)
and top-1 accuracy over `tokens` targets (the same windows as eval_losses)."""

SPECULATIVE = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("draft", pa.int32(), nullable=False),
    pa.field("adaptive", pa.bool_(), nullable=False),
    pa.field("new_tokens", pa.int64(), nullable=False),
    pa.field("forwards", pa.int64(), nullable=False),
    pa.field("tokens_per_forward", pa.float64(), nullable=False),
    pa.field("seconds", pa.float64(), nullable=False),
    pa.field("speedup", pa.float64(), nullable=False),
])
"""evaluate, per multi-token model: greedy decoding (draft 0) and self-speculative decoding with `draft` drafted
tokens per forward (`adaptive`: the default adaptive draft length, at most `draft`) on the same validation
prompts in the same process (outputs checked identical); speedup = greedy seconds / these seconds."""

LATENTS = pa.schema([
    pa.field("concept_id", pa.int32(), nullable=False),
    pa.field("num_tokens", pa.int64(), nullable=False),
    pa.field("num_active", pa.int64(), nullable=False),
    pa.field("density", pa.float64(), nullable=False),
    pa.field("max_activation", pa.float32(), nullable=False),
    pa.field("mean_activation", pa.float32(), nullable=False),
    pa.field("dead", pa.bool_(), nullable=False),
    pa.field("promoted_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("promoted_logits", pa.list_(pa.float32()), nullable=False),
    pa.field("suppressed_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("suppressed_logits", pa.list_(pa.float32()), nullable=False),
])
"""latent_dashboards, one row per SAE latent over the scanned tokens: num_active = tokens where it is among the
SAE's top-k with activation > 0, density = num_active / num_tokens, mean_activation over those tokens, dead = never
active; promoted/suppressed: the token ids (and logit contributions, descending / ascending) of the decoder
direction times the final norm's gain through the reference's unembedding (the final norm's scaling ignored)."""

LATENT_CONTEXTS = pa.schema([
    pa.field("concept_id", pa.int32(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("token_index", pa.int64(), nullable=False),
    pa.field("activation", pa.float32(), nullable=False),
    pa.field("start_index", pa.int64(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("activations", pa.list_(pa.float32()), nullable=False),
    pa.field("text", pa.string(), nullable=False),
])
"""latent_dashboards, a latent's top-activating contexts: rank 1 = its highest activation, at input token
token_index of the split's stream; the context is the tokens start_index .. start_index + len(token_ids) - 1 (the
peak's window, a few tokens each side), with the latent's activation on each; text = the context decoded."""
