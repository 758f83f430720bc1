"""The engine: pre-fill a video once into memory, answer questions from it (dense, chunked, bi-level)."""
