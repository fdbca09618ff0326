"""The strict pydantic base every lmpipe config derives from."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Frozen, rejects unknown fields; field docstrings become descriptions (and Prefect UI form text)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    def input_files(self) -> dict[str, list[str]]:
        """The local files (paths or globs) the stage of this config reads, by the field that lists them: a run
        checks they exist before it starts anything (stages/run_plan.py). None here; configs that read files say."""
        return {}
