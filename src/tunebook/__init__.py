"""tunebook: a recipe book for fine-tuning small LLMs with LoRA/QLoRA on Hugging Face TRL."""

__version__ = "0.1.0"
