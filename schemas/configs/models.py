"""The transformer shape shared by the base, reference and target models.

Fields added after the first release are left out of dumps while at their default, so the artifact keys of
configs that do not use them stay what they were.
"""

from typing import Literal

from pydantic import Field, model_validator

from schemas.base import StrictModel
from schemas.configs.later_fields import LaterFields


class Llama3RopeScaling(StrictModel):
    """Llama 3.1's rotary frequency scaling (config.json `rope_type: llama3`): wavelengths shorter than
    original_max_position_embeddings / high_freq_factor keep their frequency, those longer than
    original_max_position_embeddings / low_freq_factor are divided by `factor`, and those between blend the two
    linearly in original_max_position_embeddings / wavelength."""

    rope_type: Literal["llama3"] = "llama3"
    """The scaling's name in config.json (the only one lmpipe implements)."""
    factor: float = Field(gt=0)
    """How much longer the extended context is than the original (8 for Llama 3.1, 32 for 3.2)."""
    low_freq_factor: float = Field(gt=0)
    """Wavelengths over original_max_position_embeddings / low_freq_factor are divided by `factor` (1 in Llama 3)."""
    high_freq_factor: float = Field(gt=0)
    """Wavelengths under original_max_position_embeddings / high_freq_factor keep their frequency (4 in Llama 3)."""
    original_max_position_embeddings: int = Field(ge=1)
    """The context the model was pretrained with before the extension (8192 for Llama 3.1)."""

    @model_validator(mode="after")
    def _check_band(self) -> "Llama3RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling: high_freq_factor ({self.high_freq_factor}) must exceed "
                             f"low_freq_factor ({self.low_freq_factor})")
        return self


class ModelConfig(LaterFields):
    """Decoder-only transformer shape (vocab size and context come from the tokens artifact)."""

    LATER = {"num_kv_heads": None, "mlp_hidden": None, "rope_scaling": None}

    num_layers: int = Field(4, ge=1)
    """Transformer blocks in total, prediction heads included (multi-token heads replace trunk layers)."""
    num_heads: int = Field(4, ge=1)
    """Attention (query) heads per block."""
    num_kv_heads: int | None = Field(None, ge=1)
    """Key/value heads per block (grouped-query attention: query head h reads key/value head
    h // (num_heads / num_kv_heads)); None: num_heads (multi-head attention). Must divide num_heads."""
    d_model: int = Field(128, ge=8)
    """Residual stream width."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """MLP type: SwiGLU (Llama-style, exportable to transformers) or GELU."""
    mlp_ratio: float = Field(8 / 3, gt=0)
    """MLP hidden width as a multiple of d_model (rounded up to a multiple of 8)."""
    mlp_hidden: int | None = Field(None, ge=1)
    """MLP hidden width given exactly (an imported checkpoint's intermediate_size); None: from mlp_ratio."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rope_scaling: Llama3RopeScaling | None = None
    """Frequency scaling of the rotary embedding (an imported Llama 3.1/3.2 checkpoint's); None: plain rotary."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (residual projections are scaled by 1/sqrt(2*layers))."""

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads})")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError(f"model: head dim d_model/num_heads = {self.d_model // self.num_heads} "
                             "must be even (rotary)")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads "
                             f"({self.num_kv_heads}): each key/value head serves a whole group of query heads")
        return self

    @property
    def kv_heads(self) -> int:
        """Key/value heads per block (num_heads unless grouped-query attention)."""
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.num_heads

