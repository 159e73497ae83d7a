"""lorakit: fine-tune small language models with LoRA and QLoRA."""
__version__ = "0.1.0"
