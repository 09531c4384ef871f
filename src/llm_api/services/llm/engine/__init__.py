"""Continuous batching for in-process llama.cpp models: one engine thread per model decodes all
running sequences together in one `llama_batch` per step (see engine.py)."""
