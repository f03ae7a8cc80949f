"""vlmtune: fine-tune Phi-3-Vision on a product catalog across a Ray cluster with DeepSpeed."""

__version__ = "0.1.0"
