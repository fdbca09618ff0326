"""Config of the evaluate stage: which held-out data the trained models are compared on, and how."""

from pydantic import Field

from schemas.base import StrictModel
from schemas.configs.corpus import TextUnit


class EvaluateConfig(StrictModel):
    """Comparison of the trained models."""

    baseline: str = "ntp"
    """Variant the others are compared against (tokens to reach its final validation loss)."""
    extra_files: list[str] = []
    """Extra held-out files, read like tokenize.paths (.txt cut by extra_text_unit, .jsonl, .parquet; a glob's
    matches are read together): each entry is evaluated as its own split `file:<name>`, its documents tokenized
    with the corpus tokenizer, each followed by <|endoftext|>."""
    extra_text_unit: TextUnit = "file"
    """How extra .txt files are cut into documents: `file` (the default, one document per file), `paragraph`
    (separated by empty or whitespace-only lines) or `line` (one per non-empty line), as tokenize.text_unit."""
    extra_text_column: str = "text"
    """The field / column of extra .jsonl/.parquet files that holds the text (as tokenize.text_column)."""
    max_windows: int | None = Field(None, ge=1)
    """Windows per split evaluated for the final table: None evaluates every window of `val`, `ref_val` and
    each extra file; a number caps it with windows spread over the split (the same for every model)."""
    domain_windows: int = Field(128, ge=1)
    """Selecting targets: `train` windows (spread over the split) on which the final target's and the reference's
    losses are compared per side of the reference subset (selection_by_domain.parquet)."""
    speculative_prompts: int = Field(8, ge=1)
    """Multi-token models: validation prompts (the first 16 tokens of windows spread over `val`) decoded greedily
    and self-speculatively to measure the speed-up."""
    speculative_new_tokens: int = Field(48, ge=1)
    """Multi-token models: tokens generated per prompt in the speed-up measurement."""

    def input_files(self) -> dict[str, list[str]]:
        """The extra held-out files, if any."""
        return {"evaluate.extra_files": list(self.extra_files)} if self.extra_files else {}
