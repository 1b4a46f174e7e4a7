"""qlora-sft: one QLoRA supervised fine-tuning recipe, from one GPU to a SLURM cluster."""

__version__ = "0.1.0"
