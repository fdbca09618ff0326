"""Pause slots: CoCoMix's interleaving with one learned vector instead of the concept (its compute control).

The part only inserts: a `pause` insert before block `pause.block` (the middle by default), read from the pause
slot or the token's own (`pause.readout`); no loss term, no upstream input.
"""

from schemas.configs import ModelConfig, PauseConfig
from schemas.manifest import Manifest
from stages.objectives.part import Part, insert_block


class Pause(Part):
    """A learned pause vector interleaved with the hidden stream."""

    name = "pause"

    def __init__(self, cfg: PauseConfig):
        self.cfg = cfg

    def inserts(self, model_cfg: ModelConfig, num_heads: int, upstream: dict[str, Manifest]) -> dict[int, dict]:
        """One `pause` insert."""
        spec = {"kind": "pause"} if self.cfg.readout == "pause" else {"kind": "pause", "readout": self.cfg.readout}
        return {insert_block(self.cfg.block, model_cfg.num_layers, num_heads) - 1: spec}
