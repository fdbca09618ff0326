"""Bring your own model: the roles that start from a Hugging Face checkpoint folder (`init_from` on base, teacher,
reference, target), a pretrained SAE (`sae.init_from`) and a checkpoint's tokenizer, at planning time.

- `resolve(cfg)` (stages/dag.py's plan calls it first): each such role's `model` becomes the checkpoint's shape
  (Llama; a shape given as well, i.e. a field away from ModelConfig's default, must agree), and its `init_digest`
  the sha256 of the folder's files (stages/models/checkpoint_files.py, hashed once per process), so the artifact
  key changes with any file. Likewise `sae.init_digest` and `tokenize.tokenizer_digest`; tokenizer='model'
  takes its folder from the first of base, teacher, reference, target init_from. The digest is data of the
  config the key hashes (not an extra key input), so storage.materialize recomputes the same key. A config
  without these fields is returned unchanged (its keys stay what they were).
- `check_inputs(cfg)` (`lmpipe run` calls it before Prefect starts): everything a run would trip on later, read
  from config files and safetensors headers only, each a one-line ValueError naming the file and the fix:
  missing config.json or weights, a missing shard, an architecture the role cannot use (only Llama is trained),
  tensor shapes, a vocabulary larger than a model's embedding (naming both sizes) or a BPE trained here against
  a pretrained model, an SAE whose width or layer does not fit the teacher, a distillation teacher of another
  vocabulary.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.configs import ModelConfig, PipelineConfig
from stages.corpus.tokenizers import load_gpt2, load_tokenizer_file
from stages.models.checkpoint_files import TOKENIZER_FILES, folder_digest
from stages.models.gpt import GPT
from stages.models.hf_adapter import frozen_shape, read_config
from stages.models.hf_import import LlamaCheckpoint, check_tensors, llama_model_config, llama_parameters, weight_files
from stages.models.sae_layouts import read_sae_folder

ROLES = ("base", "teacher", "reference", "target")
"""Config sections that take init_from, in the order tokenizer='model' looks for a checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint folder's config.json says (no weight read)."""

    directory: Path
    architecture: str
    model: ModelConfig | None
    """The lmpipe shape of a Llama checkpoint; None for one that serves frozen roles only."""
    why_frozen: str
    """Why it is not trainable ('' for Llama)."""
    shape: dict
    """num_layers, d_model, num_heads, vocab_size, max_positions (any supported architecture)."""


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """Read a checkpoint folder's config.json; ValueError when it is missing or no role can use it."""
    directory = Path(directory)
    config = read_config(directory)
    shape = frozen_shape(config, directory / "config.json")
    architecture = (config.get("architectures") or [config.get("model_type")])[0]
    try:
        model, _, _ = llama_model_config(config, directory / "config.json")
        return Checkpoint(directory, architecture, model, "", shape)
    except ValueError as err:
        return Checkpoint(directory, architecture, None, str(err).split(": ", 1)[-1], shape)


def checkpoint_roles(cfg: PipelineConfig) -> dict[str, object]:
    """Config section name -> role config, for the roles with init_from."""
    return {name: role for name in ROLES if (role := getattr(cfg, name)) is not None and role.init_from}


def _agreed(path: str, given: ModelConfig, checkpoint: Checkpoint) -> dict:
    """The checkpoint's shape, after checking every field `given` sets away from the default agrees with it."""
    default = ModelConfig()
    found = checkpoint.model.model_dump() if checkpoint.model is not None else checkpoint.shape
    for field, value in given:
        if field in found and value != getattr(default, field) and value != found[field]:
            raise ValueError(f"{path}.{field}={value} but {checkpoint.directory / 'config.json'} has {found[field]}; "
                             f"drop {path}.{field} (the shape comes from the checkpoint) or give a matching checkpoint")
    return checkpoint.model.model_dump(mode="json") if checkpoint.model is not None else given.model_dump(mode="json")


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """cfg with the checkpoint roles' shapes and digests filled in (see the module doc); cfg itself when none."""
    todo = {name: role for name, role in checkpoint_roles(cfg).items() if role.init_digest is None}
    tokenize, sae = cfg.tokenize, cfg.sae
    model_tokenizer = tokenize.tokenizer == "model" and tokenize.tokenizer_path is None and bool(checkpoint_roles(cfg))
    if not (todo or model_tokenizer or (tokenize.tokenizer_path and tokenize.tokenizer_digest is None)
            or (sae.init_from and sae.init_digest is None)):
        return cfg
    data = cfg.model_dump(mode="json")
    for name, role in todo.items():
        checkpoint = read_checkpoint(role.init_from)
        for section in [name] + (["reference", "target"] if name == "base" else []):
            data[section]["model"] = _agreed(f"{section}.model", getattr(cfg, section).model, checkpoint)
        data[name]["init_digest"] = folder_digest(role.init_from)
    if model_tokenizer:
        data["tokenize"]["tokenizer_path"] = next(iter(checkpoint_roles(cfg).values())).init_from
    if data["tokenize"].get("tokenizer_path") and tokenize.tokenizer_digest is None:
        path = data["tokenize"]["tokenizer_path"]
        data["tokenize"]["tokenizer_digest"] = folder_digest(path, TOKENIZER_FILES if Path(path).is_dir() else None)
    if sae.init_from and sae.init_digest is None:
        data["sae"]["init_digest"] = folder_digest(sae.init_from)
    return PipelineConfig.model_validate(data)


def _corpus_vocab(cfg: PipelineConfig) -> int:
    """Ids of the corpus tokenizer (with added tokens); ValueError for a BPE trained here."""
    tokenize = cfg.tokenize
    if tokenize.tokenizer == "bpe":
        raise ValueError("tokenize.tokenizer='bpe' trains a new vocabulary, which a pretrained model cannot read: "
                         "use the checkpoint's tokenizer with --set tokenize.tokenizer=model")
    tokenizer = load_gpt2() if tokenize.tokenizer == "gpt2" else load_tokenizer_file(Path(tokenize.tokenizer_path))
    return tokenizer.get_vocab_size(with_added_tokens=True)


def _check_weights(name: str, checkpoint: Checkpoint, seq_len: int) -> None:
    """The weight files exist (every shard), and a Llama checkpoint's tensors fit its shape."""
    files = weight_files(checkpoint.directory)  # a missing file or shard is an error here
    if checkpoint.model is None:
        if checkpoint.shape.get("mlp") == "gelu" and seq_len > checkpoint.shape["max_positions"]:
            raise ValueError(f"{checkpoint.directory / 'config.json'}: {checkpoint.shape['max_positions']} learned "
                             f"positions, fewer than tokenize.seq_len={seq_len}; lower tokenize.seq_len")
        return
    with torch.device("meta"):
        model = GPT(checkpoint.model, checkpoint.shape["vocab_size"], seq_len)
    check_tensors(llama_parameters(model), LlamaCheckpoint(checkpoint.directory, checkpoint.model,
                                                            checkpoint.shape["vocab_size"], seq_len, files))


def _check_given(cfg: PipelineConfig) -> None:
    """Every folder a setting needs is given: train.max_tokens = 0 and sae.max_tokens = 0 use one as it is, and
    tokenize.tokenizer='model' reads a checkpoint's (presets leave them to `--set`)."""
    sections = {name: getattr(cfg, name) for name in ROLES if getattr(cfg, name) is not None}
    for name, role in sections.items():
        if role.train.max_tokens == 0 and not role.init_from:
            raise ValueError(f"{name}.train.max_tokens=0 uses a checkpoint as it is: give one with "
                             f"--set {name}.init_from=<Hugging Face folder>")
    if cfg.sae.max_tokens == 0 and not cfg.sae.init_from:
        raise ValueError("sae.max_tokens=0 uses a pretrained SAE as it is: give one with --set sae.init_from=<folder>")
    if cfg.tokenize.tokenizer == "model" and not any(role.init_from for role in sections.values()):
        raise ValueError("tokenize.tokenizer='model' reads the tokenizer of a checkpoint: give one with "
                         "--set base.init_from=<Hugging Face folder> (or teacher/reference/target.init_from)")


def check_inputs(cfg: PipelineConfig) -> None:
    """Every bad checkpoint, tokenizer or SAE input of cfg as a one-line ValueError, before any compute."""
    _check_given(cfg)
    cfg = resolve(cfg)
    roles = checkpoint_roles(cfg)
    checkpoints = {name: read_checkpoint(role.init_from) for name, role in roles.items()}
    for name, checkpoint in checkpoints.items():
        if checkpoint.model is None and (name in ("base", "target") or roles[name].train.max_tokens > 0):
            raise ValueError(f"{name}.init_from: {checkpoint.directory / 'config.json'} is {checkpoint.architecture} "
                             f"({checkpoint.why_frozen}); only Llama-family checkpoints are trained: use it as a "
                             "reference or teacher with train.max_tokens=0, or give a Llama checkpoint")
        _check_weights(name, checkpoint, cfg.tokenize.seq_len)
    if checkpoints:
        vocab = _corpus_vocab(cfg)
        for name, checkpoint in checkpoints.items():
            if vocab > checkpoint.shape["vocab_size"]:
                raise ValueError(f"{name}.init_from: the corpus tokenizer has {vocab} ids but the model's embedding "
                                 f"in {checkpoint.directory / 'config.json'} has {checkpoint.shape['vocab_size']} "
                                 "rows; "
                                 "use the checkpoint's own tokenizer (--set tokenize.tokenizer=model)")
    if "target" in roles:
        own = [v.name for v in cfg.target.variants if v.model is not None]
        if own:
            raise ValueError(f"target.variants {own} have their own model shape, but every target starts from "
                             "target.init_from; drop those variants (or their model)")
    _check_teacher(cfg, checkpoints)


def _check_teacher(cfg: PipelineConfig, checkpoints: dict[str, Checkpoint]) -> None:
    """A pretrained SAE fits the teacher's width and depth; a distillation teacher shares the targets' vocabulary."""
    teacher = checkpoints.get("teacher")
    layers = teacher.shape["num_layers"] if teacher else cfg.teacher.model.num_layers
    width = teacher.shape["d_model"] if teacher else cfg.teacher.model.d_model
    if cfg.sae.init_from:
        folder = read_sae_folder(cfg.sae.init_from)
        where = folder.directory / "cfg.json"
        if folder.d_in != width:
            raise ValueError(f"{where}: the SAE reads width d_in={folder.d_in} but the teacher's residual stream has "
                             f"{width}; give an SAE of the teacher model (teacher.init_from)")
        if cfg.sae.layer is not None and cfg.sae.layer != folder.layer:
            raise ValueError(f"{where}: the SAE reads the residual after block {folder.layer}, sae.layer is "
                             f"{cfg.sae.layer}; drop sae.layer (it comes from the SAE's hook)")
        if folder.layer >= layers:
            raise ValueError(f"{where}: the SAE reads block {folder.layer}, the teacher has {layers} blocks")
    elif teacher and cfg.sae.layer is not None and cfg.sae.layer >= layers:
        raise ValueError(f"sae.layer ({cfg.sae.layer}) must be a teacher block 0..{layers - 1}")
    if teacher and any(v.distill is not None for v in cfg.target.variants):
        target = checkpoints.get("target")
        student = target.shape["vocab_size"] if target else _corpus_vocab(cfg)
        if student != teacher.shape["vocab_size"]:
            raise ValueError(f"teacher.init_from: the teacher's {teacher.shape['vocab_size']} logits do not match "
                             f"the students' {student}; distill from a teacher of the targets' vocabulary")
