"""Tiny random Hugging Face checkpoints (Llama with and without GQA, tied or untied; GPT-2; Qwen2) saved with
save_pretrained beside a tiny tokenizer, and pretrained-SAE folders in the sae-lens and sparsify layouts: the
inputs of the bring-your-own-model tests (tests/stages/test_byom*.py)."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 64
"""Embedding rows of every tiny checkpoint (tests/helpers.VOCAB: the fake tokens artifact's vocabulary)."""
WIDTH = 32
TEXT = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song", "rain fell on the town"] * 4


def save_tokenizer(directory: Path, eos: str = "<|endoftext|>", vocab_size: int = 48) -> int:
    """A word-level BPE with `eos` as its special end token, saved as a PreTrainedTokenizerFast; returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos, "[UNK]"],
                                                            show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, unk_token="[UNK]").save_pretrained(directory)
    return tokenizer.get_vocab_size(with_added_tokens=True)


def llama_checkpoint(directory: Path, *, gqa: bool = False, tied: bool = False, layers: int = 2, seed: int = 0,
                     eos: str = "<|endoftext|>") -> Path:
    """A random LlamaForCausalLM (width 32, 4 query heads, 2 key/value heads with gqa) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=56, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(directory)
    save_tokenizer(directory, eos)
    return Path(directory)


def gpt2_checkpoint(directory: Path, *, layers: int = 2, seed: int = 0, vocab: int | None = VOCAB) -> Path:
    """A random GPT2LMHeadModel (width 32, 2 heads, 64 positions, `vocab` rows: None = exactly the tokenizer's)
    and its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    size = save_tokenizer(directory)
    config = GPT2Config(vocab_size=vocab or size, n_embd=WIDTH, n_layer=layers, n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return Path(directory)


def qwen2_checkpoint(directory: Path, *, seed: int = 0) -> Path:
    """A random Qwen2ForCausalLM (q/k/v biases, GQA) and its tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # random biases, so a test sees them used
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return Path(directory)


def sae_tensors(d_in: int = WIDTH, d_sae: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random sae-lens tensors: W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec."""
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5, "b_enc": torch.randn(d_sae, generator=g) * .1,
            "W_dec": torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5, "b_dec": torch.randn(d_in, generator=g) * .1}


def sae_lens_folder(directory: Path, tensors: dict, *, hook: str = "blocks.0.hook_resid_post", k: int | None = 8,
                    apply_b_dec_to_input: bool = True, legacy: bool = False) -> Path:
    """An sae-lens folder: 6.x cfg.json (metadata.hook_name), or a pre-6 one (hook_point, activation_fn)."""
    directory.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = tensors["W_enc"].shape
    if legacy:
        cfg = {"hook_point": hook, "d_in": d_in, "d_sae": d_sae, "activation_fn_str": "topk" if k else "relu",
               "activation_fn_kwargs": {"k": k} if k else {}, "apply_b_dec_to_input": apply_b_dec_to_input,
               "normalize_activations": "none"}
    else:
        cfg = {"architecture": "topk" if k else "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
               "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": "none",
               "metadata": {"hook_name": hook, "model_name": "tiny", "sae_lens_version": "6.18.0"}} | (
            {"k": k} if k else {})
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(directory / "sae_weights.safetensors"))
    return directory


def sparsify_folder(root: Path, tensors: dict, *, layer: int = 0, k: int = 8) -> Path:
    """A sparsify folder `layers.<layer>` (encoder.weight = W_enc.T)."""
    directory = root / f"layers.{layer}"
    directory.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = tensors["W_enc"].shape
    (directory / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": d_sae // d_in,
                                                    "num_latents": d_sae, "k": k, "d_in": d_in,
                                                    "normalize_decoder": True}))
    save_file({"encoder.weight": tensors["W_enc"].T.contiguous(), "encoder.bias": tensors["b_enc"],
               "W_dec": tensors["W_dec"].contiguous(), "b_dec": tensors["b_dec"]}, str(directory / "sae.safetensors"))
    return directory
