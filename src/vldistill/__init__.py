"""vldistill: vision-language knowledge distillation on Hugging Face models."""

__version__ = "0.1.0"
