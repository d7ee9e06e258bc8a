"""llm-finetune: LoRA fine-tuning from YAML, 16-bit merge, merge verification, Hub publishing."""

__version__ = "0.1.0"

import warnings

# peft 0.21 doubles the rank and alpha of a MoE's fused gate_up_proj with rank_pattern /
# alpha_pattern entries, applies them to the parameter (the saved lora_A has 2r rows per
# expert), then warns that they matched no targeted module: noise in every MoE run.
warnings.filterwarnings(
    "ignore",
    message=r"The following (rank|alpha)_pattern keys did not match any targeted module.*"
    r"gate_up_proj",
    category=RuntimeWarning,
)
