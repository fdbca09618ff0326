"""Device choice shared by every stage: CUDA with bf16 autocast when present, else fp32 on CPU."""

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available else cpu; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='auto' or 'cpu'")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing (fp32) on CPU (bf16 matmuls are ~100x slower than fp32 on these CPUs)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
