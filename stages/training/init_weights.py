"""Start a model from a base model's weights (continual pretraining, Rho-1 Sec. 3.1): which parameter comes
from where, and the copy. Pure: no files, no logging.

The base is a plain GPT (one head, no inserts): its blocks 0..L-2 are `trunk_blocks`, block L-1 is
`head_blocks.0`. A model of the same ModelConfig with n prediction heads has trunk blocks 0..L-n-1 and n
one-block heads (stages/models/gpt.py). The mapping:
- embedding, final norm and unembedding: the base's;
- trunk block i (i < L - n): base block i;
- EVERY head block: base block L - n, the layer that follows the trunk in the base. The MTP paper's heads are
  parallel, each reading the trunk output, so each starts as the base's next layer; head 0 then computes the
  base's first L - n + 1 blocks, and with n = 1 the model IS the base (same logits). The base's blocks after
  L - n (n > 1) are not used;
- inserts (`inserts.*`: CoCoMix concept mixing, pause vectors) have no counterpart and keep their fresh init.
Anything else that does not match (a different model config or vocabulary, a base with heads or inserts, a
parameter the base lacks) is an error.
"""

import torch

from stages.models.gpt import GPT

FRESH_PREFIX = "inserts."
"""Parameters under this prefix have no counterpart in a plain base: they keep their fresh init."""


def base_block_name(depth: int, num_layers: int) -> str:
    """The module name of block `depth` (0-based) of a plain GPT of `num_layers` blocks."""
    return f"trunk_blocks.{depth}" if depth < num_layers - 1 else "head_blocks.0"


def source_name(name: str, num_layers: int, num_heads: int) -> str | None:
    """The base parameter that a parameter of a model with `num_heads` prediction heads starts from; None for
    one with no counterpart (an insert's)."""
    if name.startswith(FRESH_PREFIX):
        return None
    group, _, rest = name.partition(".")
    if group not in ("trunk_blocks", "head_blocks"):
        return name
    index, _, leaf = rest.partition(".")
    depth = int(index) if group == "trunk_blocks" else num_layers - num_heads
    return f"{base_block_name(depth, num_layers)}.{leaf}"


def _check_compatible(model: GPT, base: GPT) -> None:
    """ValueError unless the base is a plain GPT of the model's config and vocabulary."""
    if not (isinstance(model, GPT) and isinstance(base, GPT)):
        raise ValueError(f"initialising from a base maps GPT parameters; got a {type(model).__name__} model and a "
                         f"{type(base).__name__} base")
    if base.num_future_tokens != 1 or len(base.inserts):
        raise ValueError(f"the base model must be a plain next-token GPT, got {base.num_future_tokens} heads and "
                         f"inserts after blocks {sorted(base.insert_specs)}; train it with train_base")
    differ = sorted(name for name, value in model.cfg if value != getattr(base.cfg, name))
    if differ:
        raise ValueError(f"the model config differs from the base's in {differ}; give reference.model and "
                         f"target.model the values of base.model")
    if model.vocab_size != base.vocab_size:
        raise ValueError(f"vocabulary of {model.vocab_size} tokens, the base has {base.vocab_size}: the base must "
                         f"be trained on the same tokenize_corpus artifact")


def weight_sources(model: GPT, base: GPT) -> dict[str, str | None]:
    """Every parameter of `model` (tied ones once) -> the base parameter it starts from, None when it keeps its
    fresh init; ValueError when the two do not fit (see the module doc)."""
    _check_compatible(model, base)
    base_shapes = {name: tensor.shape for name, tensor in base.state_dict().items()}
    sources = {}
    for name, param in model.named_parameters():
        source = source_name(name, model.cfg.num_layers, model.num_future_tokens)
        if source is not None and source not in base_shapes:
            raise ValueError(f"parameter {name} has no counterpart {source} in the base model")
        if source is not None and base_shapes[source] != param.shape:
            raise ValueError(f"parameter {name} has shape {tuple(param.shape)}, its base counterpart {source} "
                             f"{tuple(base_shapes[source])}")
        sources[name] = source
    return sources


def init_from_base(model: GPT, base: GPT) -> dict[str, str | None]:
    """Copy the base's weights into `model` in place as weight_sources maps them; returns that mapping."""
    sources = weight_sources(model, base)
    base_state, params = base.state_dict(), dict(model.named_parameters())
    with torch.no_grad():
        for name, source in sources.items():
            if source is not None:
                params[name].copy_(base_state[source])
    return sources
