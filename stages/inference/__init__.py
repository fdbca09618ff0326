"""Using trained models: generation with a KV cache, Hugging Face export."""
