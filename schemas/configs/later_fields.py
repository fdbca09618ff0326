"""Config fields added after a config's first release, left out of dumps (the JSON data that artifact keys hash)
while at their default, so configs that do not use them keep their artifact keys."""

from typing import ClassVar

from pydantic import model_serializer

from schemas.base import StrictModel


class LaterFields(StrictModel):
    """A StrictModel whose `LATER` fields (name -> default) are dropped from dumps while at that default."""

    LATER: ClassVar[dict[str, object]] = {}

    @model_serializer(mode="wrap")
    def _drop_later_defaults(self, handler):
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in self.LATER and v == self.LATER[k])}

