"""llm-finetune: LoRA fine-tuning from YAML, 16-bit merge, merge verification, Hub publishing."""

__version__ = "0.1.0"
