"""fat5-hf: fast T5-family encoder-decoders for Hugging Face Transformers + Accelerate."""

__version__ = "0.1.0.dev0"
