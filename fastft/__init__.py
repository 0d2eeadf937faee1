"""fastft: faster, leaner fine-tuning for Hugging Face TRL."""

__version__ = "0.1.0"
