"""Pretrained SAEs in the layouts other tools write, as lmpipe TopKSAEs, and lmpipe's SAE in the sae-lens layout.

sae-lens (cfg.json + sae_weights.safetensors): W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec; hook_name
`blocks.N.hook_resid_post` (the residual after block N) or `blocks.N.hook_resid_pre` (after block N - 1), at the
top level (before 6.0, with `hook_point`, `activation_fn_str`/`activation_fn` + `activation_fn_kwargs.k`) or under
`metadata` (6.x); architecture `topk` (k) or `standard` (ReLU). Forward: pre = (x - b_dec * apply_b_dec_to_input)
@ W_enc + b_enc; acts = relu(topk(pre)) or relu(pre); xhat = acts @ W_dec + b_dec.
EleutherAI sparsify (one folder per hookpoint, `layers.N` = the output of decoder layer N; cfg.json with k,
num_latents or expansion_factor, d_in; sae.safetensors with encoder.weight (L, d_in), encoder.bias, W_dec (L, d_in),
b_dec): pre = relu(encoder(x - b_dec)), top k, xhat = acts @ W_dec + b_dec.

The mapping onto TopKSAE (pre = (x - pre_bias) @ W_enc.T + latent_bias, top k, ReLU, xhat = sparse decode +
pre_bias) is exact: W_enc = W_enc.T (or encoder.weight), pre_bias = b_dec, latent_bias = b_enc (+ b_dec @ W_enc
when b_dec is not subtracted from the input). A ReLU SAE becomes a TopK SAE with k = the cap sae.k (default
RELU_K): relu(topk(pre)) equals the top k of relu(pre), so the result is exact for every token with at most k
active latents; L0 is counted after the cap. Inputs: sae-lens `normalize_activations: layer_norm` is lmpipe's
per-token layer norm; `none` reads the raw residual, centred per token for a GPT-2 SAE trained through
TransformerLens (its default `center_writing_weights` removes each token's mean from the residual). Other
normalisations, JumpReLU/gated SAEs, transcoders and skip connections are refused with a one-line error.
Every check reads only cfg.json and the safetensors header (read_sae_folder), before any weight.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stages.models.sae import TopKSAE
from storage.atomic import atomic_path, write_text_atomic

RELU_K = 128
"""Active latents kept per token of an imported ReLU SAE when sae.k is not given."""
SAE_LENS_WEIGHTS, SPARSIFY_WEIGHTS, SAE_CFG = "sae_weights.safetensors", "sae.safetensors", "cfg.json"


@dataclass(frozen=True)
class SAEFolder:
    """A checked pretrained SAE folder: its layout and what lmpipe makes of it."""

    directory: Path
    layout: str
    """`sae-lens` or `sparsify`."""
    d_in: int
    num_latents: int
    k: int | None
    """Active latents (None: a ReLU SAE)."""
    layer: int
    """lmpipe's residual site: the residual after this block."""
    input_norm: str
    """TopKSAE.INPUT_NORMS for a model of LayerNorm blocks (`center` becomes `none` for an RMSNorm model)."""
    b_dec_in_input: bool
    tensors: dict[str, str]
    """lmpipe role (W_enc, W_dec, b_enc, b_dec) -> tensor name in the file."""


def _fail(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what}")


def _layer_of_hook(hook: str, path: Path) -> int:
    """blocks.N.hook_resid_post -> N, blocks.N.hook_resid_pre -> N - 1, layers.N / h.N -> N."""
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook):
        return int(m.group(1))
    if (m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook)) and int(m.group(1)) > 0:
        return int(m.group(1)) - 1
    if m := re.fullmatch(r"(?:model\.)?(?:layers|h|transformer\.h)\.(\d+)", hook):
        return int(m.group(1))
    raise _fail(path, f"hook {hook!r} is not a residual-stream site lmpipe reads; use an SAE of "
                      "blocks.N.hook_resid_post, blocks.N.hook_resid_pre (N >= 1) or layers.N")


def _sae_lens(directory: Path, cfg: dict) -> SAEFolder:
    path = directory / SAE_CFG
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if not hook:
        raise _fail(path, "no hook_name (metadata.hook_name or hook_name); it names the layer the SAE reads")
    arch = cfg.get("architecture") or ("topk" if (cfg.get("activation_fn") or cfg.get("activation_fn_str")) == "topk"
                                       else "standard")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch not in ("topk", "standard") or (arch == "topk" and not k):
        raise _fail(path, f"architecture {arch!r}{' without k' if arch == 'topk' else ''}; lmpipe imports TopK "
                          "(with k) and ReLU (`standard`) SAEs")
    norm = cfg.get("normalize_activations", "none")
    norm = {False: "none", None: "none"}.get(norm, norm)
    if norm not in ("none", "layer_norm"):
        raise _fail(path, f"normalize_activations {norm!r} is not supported (only none and layer_norm); fold the "
                          "scale into the weights first")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise _fail(path, "rescale_acts_by_decoder_norm is true; lmpipe imports SAEs without it")
    centred = (meta.get("model_from_pretrained_kwargs") or cfg.get("model_from_pretrained_kwargs") or {}).get(
        "center_writing_weights", True)
    return SAEFolder(directory, "sae-lens", int(cfg["d_in"]), int(cfg["d_sae"]), int(k) if arch == "topk" else None,
                     _layer_of_hook(hook, path), "layer_norm" if norm == "layer_norm" else
                     ("center" if centred else "none"), bool(cfg.get("apply_b_dec_to_input", True)),
                     {"W_enc": "W_enc", "W_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec"})


def _sparsify(directory: Path, cfg: dict) -> SAEFolder:
    path = directory / SAE_CFG
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise _fail(path, f"{flag} is true; lmpipe imports plain residual SAEs")
    if cfg.get("activation", "topk") != "topk":
        raise _fail(path, f"activation {cfg['activation']!r}; lmpipe imports TopK sparsify SAEs")
    if "d_in" not in cfg:
        raise _fail(path, "no d_in (sparsify writes it at save time); add the hook's width as d_in")
    d_in = int(cfg["d_in"])
    latents = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    return SAEFolder(directory, "sparsify", d_in, latents, int(cfg.get("k", 32)),
                     _layer_of_hook(directory.name, path), "none", True,
                     {"W_enc": "encoder.weight", "W_dec": "W_dec", "b_enc": "encoder.bias", "b_dec": "b_dec"})


def read_sae_folder(directory: str | Path) -> SAEFolder:
    """Check a pretrained SAE folder (config, layout, tensor names and shapes) without reading a weight."""
    directory = Path(directory)
    path = directory / SAE_CFG
    if not path.is_file():
        raise _fail(path, "missing; a pretrained SAE folder needs cfg.json (sae-lens or sparsify layout)")
    cfg = json.loads(path.read_text())
    if (directory / SAE_LENS_WEIGHTS).is_file():
        folder, weights = _sae_lens(directory, cfg), directory / SAE_LENS_WEIGHTS
        shapes = {"W_enc": (folder.d_in, folder.num_latents), "W_dec": (folder.num_latents, folder.d_in)}
    elif (directory / SPARSIFY_WEIGHTS).is_file():
        folder, weights = _sparsify(directory, cfg), directory / SPARSIFY_WEIGHTS
        shapes = {"W_enc": (folder.num_latents, folder.d_in), "W_dec": (folder.num_latents, folder.d_in)}
    else:
        raise _fail(directory, f"no {SAE_LENS_WEIGHTS} (sae-lens) or {SPARSIFY_WEIGHTS} (sparsify); copy the "
                               "SAE's weights next to its cfg.json")
    shapes |= {"b_enc": (folder.num_latents,), "b_dec": (folder.d_in,)}
    with safe_open(weights, "pt") as f:
        for role, name in folder.tensors.items():
            if name not in f.keys():
                raise _fail(weights, f"tensor {name} is missing; the file is not a complete {folder.layout} SAE")
            if tuple(f.get_slice(name).get_shape()) != shapes[role]:
                raise _fail(weights, f"tensor {name} has shape {f.get_slice(name).get_shape()}, cfg.json says "
                                     f"{list(shapes[role])}")
    return folder


def load_pretrained_sae(directory: str | Path, k: int | None = None, layer_norm_model: bool = True) -> TopKSAE:
    """The SAE of a pretrained folder as a TopKSAE (fp32, CPU). `k`: the cap of a ReLU SAE (default RELU_K) or,
    for a TopK SAE, its own k (another is an error); `layer_norm_model`: the model's blocks use LayerNorm (GPT-2),
    so a TransformerLens-trained SAE reads the centred residual."""
    folder = read_sae_folder(directory)
    if folder.k is not None and k is not None and k != folder.k:
        raise ValueError(f"{folder.directory / SAE_CFG}: a TopK SAE with k={folder.k}, but sae.k={k}; drop sae.k")
    norm = "none" if folder.input_norm == "center" and not layer_norm_model else folder.input_norm
    weights = folder.directory / (SAE_LENS_WEIGHTS if folder.layout == "sae-lens" else SPARSIFY_WEIGHTS)
    with safe_open(weights, "pt") as f:
        t = {role: f.get_tensor(name).float() for role, name in folder.tensors.items()}
    W_enc_LD = t["W_enc"].T if folder.layout == "sae-lens" else t["W_enc"]
    latent_bias = t["b_enc"] if folder.b_dec_in_input else t["b_enc"] + W_enc_LD @ t["b_dec"]
    sae = TopKSAE(folder.d_in, folder.num_latents, folder.k or min(k or RELU_K, folder.num_latents),
                  input_norm=norm)
    with torch.no_grad():
        for param, value in ((sae.W_enc, W_enc_LD), (sae.W_dec, t["W_dec"]), (sae.pre_bias, t["b_dec"]),
                             (sae.latent_bias, latent_bias)):
            param.copy_(value)
    return sae.eval()


def save_sae_lens(directory: str | Path, sae: TopKSAE, layer: int, model_name: str = "lmpipe",
                  context_size: int | None = None) -> Path:
    """Write `sae` in the sae-lens layout (cfg.json + sae_weights.safetensors, hook blocks.<layer>.hook_resid_post;
    an SAE of the centred residual records center_writing_weights); read back by load_pretrained_sae with the same
    activations."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    norm = "layer_norm" if sae.input_norm == "layer_norm" else "none"  # `center`: TransformerLens' centred residual
    plain = lambda t: t.detach().float().contiguous().cpu()  # noqa: E731
    tensors = {"W_enc": plain(sae.W_enc.T), "b_enc": plain(sae.latent_bias), "W_dec": plain(sae.W_dec),
               "b_dec": plain(sae.pre_bias)}
    with atomic_path(directory / SAE_LENS_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    cfg = {"architecture": "topk", "d_in": sae.d_model, "d_sae": sae.num_latents, "k": sae.k, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": norm,
           "reshape_activations": "none", "metadata": {
               "hook_name": f"blocks.{layer}.hook_resid_post", "model_name": model_name, "prepend_bos": False,
               "context_size": context_size,
               "model_from_pretrained_kwargs": {"center_writing_weights": sae.input_norm == "center"},
               "sae_lens_version": "6.0.0"}}
    write_text_atomic(directory / SAE_CFG, json.dumps(cfg, indent=2) + "\n")
    return directory
