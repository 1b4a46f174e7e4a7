"""Run by tests/test_paged_optimizer.py in a child process (a failing bitsandbytes prefetch exits the
whole process): a bitsandbytes paged optimizer resumed through the Trainer's own optimizer loading,
as it runs when world_size > 1 (the state is loaded onto the GPU), with or without qlora-sft's
re-paging. Prints one JSON line.

    python paged_resume.py OPTIM DIR {fixed|unfixed}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import torch


def trainer(optim: str, out: Path, fixed: bool):
    from transformers import Trainer, TrainingArguments

    from qlora_sft.checkpoint import trainer_class

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 8)).cuda()  # 262k weights: paged
    args = TrainingArguments(str(out), optim=optim, learning_rate=1e-3, report_to=[], max_steps=10)
    cls = trainer_class(Trainer) if fixed else Trainer
    t = cls(model=model, args=args)
    if fixed:  # the resume check compares the adapter with a checkpoint's: not part of this test
        t.ckpt = None
    t.create_optimizer_and_scheduler(num_training_steps=10)
    return t


def step(t) -> None:
    x = torch.randn(16, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(int(t.state.global_step)))
    t.model(x).pow(2).mean().backward()
    t.optimizer.step()
    t.optimizer.zero_grad()
    t.lr_scheduler.step()
    t.state.global_step += 1


def main(optim: str, folder: str, variant: str) -> None:
    from transformers import TrainingArguments

    out, fixed = Path(folder), variant == "fixed"
    straight = trainer(optim, out / "straight", fixed)
    for _ in range(4):
        step(straight)
    first = trainer(optim, out / "first", fixed)
    for _ in range(2):
        step(first)
    ckpt = out / "checkpoint-2"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save(first.optimizer.state_dict(), ckpt / "optimizer.pt")
    torch.save(first.lr_scheduler.state_dict(), ckpt / "scheduler.pt")
    torch.save(first.model.state_dict(), ckpt / "model.pt")
    resumed = trainer(optim, out / "resumed", fixed)
    resumed.model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
    resumed.state.global_step = 2
    # what the Trainer does in a job of several processes: optimizer.pt loaded onto this GPU
    with mock.patch.object(TrainingArguments, "world_size", new_callable=mock.PropertyMock, return_value=2):
        if fixed:
            with mock.patch("qlora_sft.checkpoint.resume_problems", return_value=[]):
                resumed._load_optimizer_and_scheduler(str(ckpt))
        else:
            resumed._load_optimizer_and_scheduler(str(ckpt))
    opt = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
    paged_after_load = sum(1 for s in opt.state.values() for v in s.values() if getattr(v, "is_paged", False))
    for _ in range(2):
        step(resumed)
    torch.cuda.synchronize()
    same = all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True))
    result = {"optim": optim, "variant": variant, "paged_after_load": paged_after_load, "same_as_straight": same}
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
