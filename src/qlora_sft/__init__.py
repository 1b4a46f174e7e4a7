"""qlora-sft: one QLoRA supervised fine-tuning recipe, from one GPU to a SLURM cluster."""

from .submit import submit

__all__ = ["submit"]
__version__ = "0.1.0"
