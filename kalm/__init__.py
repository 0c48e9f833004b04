"""kalm: the KaLM-Embedding training and evaluation pipeline, one module per stage."""

__version__ = "0.1.0"
