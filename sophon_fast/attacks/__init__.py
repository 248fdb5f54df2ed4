"""Fine-tuning attacks against protected models."""

from .finetune import FineTuneAttack, finetune

__all__ = ["FineTuneAttack", "finetune"]
