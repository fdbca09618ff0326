"""The strict pydantic base every lmpipe config derives from."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Frozen, rejects unknown fields; field docstrings become descriptions (and Prefect UI form text)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
