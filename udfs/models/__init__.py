"""Learned models over clip frames: where weights come from and what device
they run on (`loading`), embeddings, captions, Qwen vision preprocessing."""
