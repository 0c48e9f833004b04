"""Backbones: loading an embedding model (a decoder made bidirectional, pooling), and a tiny Qwen2 for tests and smoke runs."""
