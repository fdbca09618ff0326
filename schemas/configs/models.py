"""The transformer shape shared by the base, reference and target models."""

from typing import Literal

from pydantic import Field, model_validator

from schemas.base import StrictModel


class ModelConfig(StrictModel):
    """Decoder-only transformer shape (vocab size and context come from the tokens artifact)."""

    num_layers: int = Field(4, ge=1)
    """Transformer blocks in total, prediction heads included (multi-token heads replace trunk layers)."""
    num_heads: int = Field(4, ge=1)
    """Attention heads per block."""
    d_model: int = Field(128, ge=8)
    """Residual stream width."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """MLP type: SwiGLU (Llama-style, exportable to transformers) or GELU."""
    mlp_ratio: float = Field(8 / 3, gt=0)
    """MLP hidden width as a multiple of d_model (rounded up to a multiple of 8)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
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
        return self
