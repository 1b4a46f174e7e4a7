"""The unsloth peer of `bench.run` (`--mode ...,unsloth`): unsloth's own QLoRA recipe on the same
model and data, timed and measured the same way.

unsloth pins `trl<=1.15` and `datasets<5`, so it lives in its own target directory, first on this
process's PYTHONPATH (`bench.run --unsloth-site`), and `import unsloth` must come before
transformers, peft and trl (it patches them): this module imports nothing of theirs at the top.

    python -m bench.unsloth_peer MODEL_DIR DATA.jsonl OUT_DIR [--steps 20] [--max-length 2048] [--micro-batch 4]

The recipe: FastLanguageModel 4-bit (NF4) in bf16, LoRA r=16 alpha=32 dropout 0 on the 7
projections, unsloth's offloaded gradient checkpointing, TRL SFTConfig with best-fit-decreasing
packing, padding-free rows, 4 rows per step (`--micro-batch`), adamw_8bit. QLORA_SFT_GPU_MEMORY_GIB
(`bench.run --gpu-cap`) caps the GPU as it does for the project's modes.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4, help="packed rows per step")
    args = ap.parse_args()
    t0 = time.time()
    # first: unsloth patches transformers, peft and trl as they are imported
    fast_language_model = importlib.import_module("unsloth").FastLanguageModel
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bench import measure
    from bench.run import write_worker_result
    from qlora_sft.launch import apply_gpu_memory_cap

    apply_gpu_memory_cap()

    model, tok = fast_language_model.from_pretrained(
        model_name=str(args.model_dir), max_seq_length=args.max_length, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = fast_language_model.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )
    ds = datasets.load_dataset("json", data_files=str(args.data), split="train")
    config = SFTConfig(
        output_dir=str(args.out / "trainer"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=2e-4,
        optim="adamw_8bit",
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=args.max_length,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        dataloader_num_workers=2,
    )
    counts = {"computed": 0, "real": 0}
    timer = measure.StepTimer()
    real_at_step: list[int] = []  # unsloth's trainer logs no `num_tokens`: count the batches' real tokens

    class RealTokens(TrainerCallback):
        def on_step_end(self, *a: object, **kw: object) -> None:
            real_at_step.append(counts["real"])

    trainer = SFTTrainer(
        model=model, args=config, train_dataset=ds, processing_class=tok, callbacks=[timer, RealTokens()]
    )
    measure.count_tokens(trainer, counts)
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    trainer.train()
    tokens = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    if len(tokens) != len(timer.times):
        tokens = [float(x) for x in real_at_step]
    write_worker_result(args.out, timer.times, tokens, start - t0, start, counts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
