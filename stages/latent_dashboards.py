"""Stage latent_dashboards: what `lmpipe inspect`'s concept view shows for every SAE latent, computed once.

Reads the tokenize_corpus artifact (the `dashboards.split` stream and tokenizer.json), the model the SAE was
trained on (train_teacher, under the role `reference`) and the train_sae SAE. Pass 1 runs that model over the
split's windows (whole windows from the start, at most `max_tokens`), encodes the residual at the SAE's layer and
keeps, per latent, how often it is active and its `contexts_per_latent` highest activations (a running top-N, so
memory is bounded by latents x N). Pass 2 re-runs only the windows holding a peak and records the latent's
activation on every token of the peak's context (the peak's window, `context_tokens` each side: what the model
saw). The promoted and suppressed tokens of a latent are the largest and smallest entries of W_U (gain * W_dec[i])
(the decoder direction through the final norm's gain and that model's unembedding; sae_vis ignores the norm's
scaling the same way).

Files written into `out`:
    latents.parquet    schemas.tables.LATENTS: per latent, density, activation stats, dead, logit effects
    contexts.parquet   schemas.tables.LATENT_CONTEXTS: per latent, its top contexts with per-token activations
"""

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tokenizers import Tokenizer

from schemas.configs import LatentDashboardConfig, PipelineConfig
from schemas.manifest import Manifest
from schemas.tables import LATENT_CONTEXTS, LATENTS
from stages.models.saved import load_model, load_sae
from stages.objectives.factory import build_objective
from stages.registry import NodeDecl, Stage
from stages.runtime.devices import resolve_device
from storage.catalog import JoinView, TableSpec
from storage.parquet import write_table
from storage.windows import TokenWindows

log = logging.getLogger(__name__)

LOGIT_CHUNK = 1024
"""Latents per unembedding product (bounds the latents x vocabulary matrix held at once)."""


class TopActivations:
    """Per latent, the `n` highest activations seen so far (ties: the earlier position first), and counts."""

    def __init__(self, num_latents: int, n: int):
        self.n, self.num_latents = n, num_latents
        self.latent, self.value, self.position = (np.zeros(0, np.int64), np.zeros(0, np.float32),
                                                  np.zeros(0, np.int64))
        self.count = np.zeros(num_latents, np.int64)
        self.total = np.zeros(num_latents, np.float64)
        self.floor = np.full(num_latents, -np.inf, np.float32)
        """The n-th best value of each latent once it has n (candidates below it cannot enter)."""

    def add(self, latent: np.ndarray, value: np.ndarray, position: np.ndarray) -> None:
        """Fold in the active (latent, activation, stream position) triples of one batch (activation > 0)."""
        self.count += np.bincount(latent, minlength=self.num_latents)
        self.total += np.bincount(latent, weights=value, minlength=self.num_latents)
        keep = value >= self.floor[latent]
        latent = np.concatenate([self.latent, latent[keep]])
        value = np.concatenate([self.value, value[keep]])
        position = np.concatenate([self.position, position[keep]])
        order = np.lexsort((position, -value, latent))
        latent, value, position = latent[order], value[order], position[order]
        first = np.searchsorted(latent, latent)  # index of each row's latent group start (latent is sorted)
        kept = np.arange(len(latent)) - first < self.n
        self.latent, self.value, self.position = latent[kept], value[kept], position[kept]
        full = np.bincount(self.latent, minlength=self.num_latents) >= self.n
        last = np.searchsorted(self.latent, np.arange(self.num_latents), side="right") - 1
        self.floor = np.where(full, self.value[np.clip(last, 0, None)] if len(self.value) else -np.inf,
                              -np.inf).astype(np.float32)

    def ranked(self) -> list[tuple[int, int, float, int]]:
        """(latent, rank from 1, activation, position) of every kept peak, by latent then rank."""
        first = np.searchsorted(self.latent, self.latent)
        ranks = np.arange(len(self.latent)) - first + 1
        return list(zip(self.latent.tolist(), ranks.tolist(), self.value.tolist(), self.position.tolist(),
                        strict=True))


def encode_windows(model, sae, windows: TokenWindows, window_ids: np.ndarray, layer: int, device):
    """(vals_NK, idx_NK) of the SAE on the reference's residual at every input position of the windows."""
    inputs_BT, _ = windows.batch(window_ids, device)
    with torch.no_grad():
        xn_ND, _, _ = sae.normalize(model.residual_after(inputs_BT, layer).flatten(0, 1))
        vals_NK, idx_NK = sae.encode(xn_ND)
    return vals_NK.float().cpu().numpy(), idx_NK.cpu().numpy()


def logit_effects(model, sae, count: int) -> dict[str, list]:
    """Per latent, the `count` token ids its decoder direction promotes most and suppresses most, with logits."""
    unembed_VD = model.lm_head.weight.detach().float().cpu()
    gain_D = model.norm.weight.detach().float().cpu() if model.norm.weight is not None else 1.0
    decoder_LD = sae.W_dec.detach().float().cpu() * gain_D
    count = min(count, unembed_VD.shape[0])
    found = {"promoted_ids": [], "promoted_logits": [], "suppressed_ids": [], "suppressed_logits": []}
    for start in range(0, decoder_LD.shape[0], LOGIT_CHUNK):
        logits_LV = decoder_LD[start:start + LOGIT_CHUNK] @ unembed_VD.T
        for name, largest in (("promoted", True), ("suppressed", False)):
            values, ids = logits_LV.topk(count, dim=1, largest=largest)
            found[f"{name}_ids"] += ids.int().tolist()
            found[f"{name}_logits"] += values.tolist()
    return found


def context_rows(peaks: list[tuple], model, sae, windows: TokenWindows, layer: int, cfg: LatentDashboardConfig,
                 tokenizer: Tokenizer, device) -> list[dict]:
    """Pass 2: each peak's context (its window, context_tokens each side) with the latent's activation per token."""
    seq_len, rows = windows.seq_len, []
    by_window: dict[int, list[tuple]] = {}
    for peak in peaks:
        by_window.setdefault(peak[3] // seq_len, []).append(peak)
    window_ids = np.array(sorted(by_window), dtype=np.int64)
    for start in range(0, len(window_ids), cfg.batch_size):
        batch = window_ids[start:start + cfg.batch_size]
        vals_NK, idx_NK = encode_windows(model, sae, windows, batch, layer, device)
        for b, window in enumerate(batch.tolist()):
            for latent, rank, value, position in by_window[window]:
                p = position - window * seq_len
                lo, hi = max(0, p - cfg.context_tokens), min(seq_len - 1, p + cfg.context_tokens)
                rows_N = b * seq_len + np.arange(lo, hi + 1)
                acts = (vals_NK[rows_N] * (idx_NK[rows_N] == latent)).sum(axis=1)
                ids = np.asarray(windows.stream[window * seq_len + lo: window * seq_len + hi + 1]).astype(np.int32)
                rows.append({"concept_id": latent, "rank": rank, "split": windows.split, "token_index": position,
                             "activation": value, "start_index": window * seq_len + lo, "token_ids": ids.tolist(),
                             "activations": acts.astype(np.float32).tolist(), "text": tokenizer.decode(ids.tolist())})
    rows.sort(key=lambda row: (row["concept_id"], row["rank"]))
    return rows


def run(cfg: LatentDashboardConfig, inputs: dict[str, Manifest], out: Path) -> dict:
    """Scan the split, keep each latent's top contexts and counts, write latents.parquet and contexts.parquet."""
    out, device = Path(out), resolve_device(cfg.device)
    model = load_model(Path(inputs["reference"].path), device).requires_grad_(False)
    sae, meta = load_sae(Path(inputs["sae"].path), device)
    layer, num_latents = int(meta["layer"]), int(meta["num_latents"])
    windows = TokenWindows.from_manifest(inputs["tokens"], cfg.split)
    tokenizer = Tokenizer.from_file(inputs["tokens"].file("tokenizer.json"))
    num_windows = len(windows) if cfg.max_tokens is None else min(len(windows), -(-cfg.max_tokens // windows.seq_len))
    top = TopActivations(num_latents, cfg.contexts_per_latent)
    for start in range(0, num_windows, cfg.batch_size):
        window_ids = np.arange(start, min(start + cfg.batch_size, num_windows))
        vals_NK, idx_NK = encode_windows(model, sae, windows, window_ids, layer, device)
        positions_N = (window_ids[:, None] * windows.seq_len + np.arange(windows.seq_len)).reshape(-1)
        fired = vals_NK > 0
        top.add(idx_NK[fired].astype(np.int64), vals_NK[fired], np.broadcast_to(positions_N[:, None],
                                                                               idx_NK.shape)[fired])
    num_tokens = num_windows * windows.seq_len
    contexts = context_rows(top.ranked(), model, sae, windows, layer, cfg, tokenizer, device)
    write_table(out / "contexts.parquet", pa.Table.from_pylist(contexts, LATENT_CONTEXTS), LATENT_CONTEXTS)
    best = np.zeros(num_latents, np.float32)
    np.maximum.at(best, top.latent, top.value)
    latents = {"concept_id": np.arange(num_latents, dtype=np.int32), "num_tokens": np.full(num_latents, num_tokens),
               "num_active": top.count, "density": top.count / max(num_tokens, 1), "max_activation": best,
               "mean_activation": (top.total / np.maximum(top.count, 1)).astype(np.float32),
               "dead": top.count == 0, **logit_effects(model, sae, cfg.logit_tokens)}
    write_table(out / "latents.parquet", latents, LATENTS)
    log.info("latent_dashboards: %d latents over %d tokens of %s, %d dead, %d contexts", num_latents, num_tokens,
             cfg.split, int((top.count == 0).sum()), len(contexts))
    return {"num_latents": num_latents, "num_tokens": num_tokens, "dead": int((top.count == 0).sum()),
            "contexts": len(contexts)}


def nodes(cfg: PipelineConfig) -> list[NodeDecl]:
    """One node when some target variant reads concept labels (the SAE is built then); none otherwise."""
    uses_concepts = any(need.stage == "extract_concepts" for variant in cfg.target.variants
                        for need in build_objective(cfg.target.model, variant).needs)
    upstream = {"tokens": "tokenize_corpus", "reference": "train_teacher", "sae": "train_sae"}  # the SAE's model
    return [NodeDecl("latent_dashboards", cfg.dashboards, upstream)] if uses_concepts else []


STAGE = Stage(
    name="latent_dashboards", code_version="1", config_type=LatentDashboardConfig, nodes=nodes, run=run,
    tables={"latents": TableSpec("latent_dashboards", "latents.parquet"),
            "latent_contexts": TableSpec("latent_dashboards", "contexts.parquet")},
    views={
        "latent_summary": JoinView(
            frozenset({"latents", "concepts"}),
            """SELECT l.* EXCLUDE (promoted_ids, promoted_logits, suppressed_ids, suppressed_logits),
                      coalesce(c.num_labelled, 0) AS num_labelled, c.top_tokens
               FROM latents l LEFT JOIN concepts c USING (concept_id)"""),
        "latent_logits": JoinView(
            frozenset({"latents", "vocab"}),
            """SELECT l.concept_id, l.direction, l.rank, l.token_id, v.token, l.logit FROM (
                   SELECT concept_id, 'promoted' AS direction, unnest(range(1, len(promoted_ids) + 1)) AS rank,
                          unnest(promoted_ids) AS token_id, unnest(promoted_logits) AS logit FROM latents
                   UNION ALL
                   SELECT concept_id, 'suppressed', unnest(range(1, len(suppressed_ids) + 1)),
                          unnest(suppressed_ids), unnest(suppressed_logits) FROM latents) l
               JOIN vocab v USING (token_id)"""),
    },
    description="per-latent density, top contexts and logit effects for `lmpipe inspect`",
)
