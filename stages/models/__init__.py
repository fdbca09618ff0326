"""Model definitions: GPT (trunk + heads)."""
