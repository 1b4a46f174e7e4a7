"""`qlora-sft train | validate` (the same CLI as `python -m qlora_sft`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override recipe keys, values parsed as YAML (e.g. train.learning_rate=1e-4 run.name=try2)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-sft",
        description="One QLoRA supervised fine-tuning recipe, from one GPU to a SLURM cluster.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for recipe and data errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune (as one process, or as a rank under accelerate launch)")
    _recipe_args(p)

    p = sub.add_parser("validate", help="check the recipe and data without training; show an example")
    _recipe_args(p)
    p.add_argument("--examples", type=int, default=1, help="how many rendered examples to show")
    p.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="mark trained tokens in colour (default: on a terminal), else with [[ ]]",
    )
    p = sub.add_parser("plan", help="what a launch will do: world size, batch arithmetic, memory per GPU")
    _recipe_args(p)
    p.add_argument("--config", help="accelerate config file of the launch (default: one process)")
    p.add_argument("--gpus", type=int, help="GPUs (processes) per node (default: the config's num_processes)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpu-mem", type=float, help="GPU memory in GiB: list which bundled configs fit")
    p.add_argument("--run-dir", action="store_true", help="only print the run directory (for scripts)")
    p = sub.add_parser("submit", help="submit the recipe with submitit (SLURM, or --cluster local)")
    _recipe_args(p)
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--tasks-per-node", type=int, help="ranks per node (default: GPUs per node, or 1)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem")
    p.add_argument("--constraint")
    p.add_argument("--extra-sbatch", action="append", help="another sbatch option, e.g. --extra-sbatch=--exclusive")
    p.add_argument("--cluster", choices=["slurm", "local"], help="default: slurm where sbatch exists, else local")
    p.add_argument("--folder", help="submitit job folder (default <output_dir>/<name>.submitit/<job id>)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    return parser


def cmd_submit(args: argparse.Namespace) -> int:
    from .submit import submit

    job = submit(
        args.recipe,
        args.overrides,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time=args.time,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        constraint=args.constraint,
        extra_sbatch=args.extra_sbatch,
        cluster=args.cluster,
        folder=args.folder,
    )
    print(f"submitted job {job.job_id}")
    print(f"  job folder: {job.paths.folder}")
    print(f"  stdout:     {job.paths.stdout}")
    print(f"  stderr:     {job.paths.stderr}")
    if args.wait:
        print(f"result: {job.result()}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import plan_lines
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.run_dir:
        print(recipe.run_dir.resolve())
        return 0
    for line in plan_lines(recipe, args.config, args.gpus, args.nodes, args.gpu_mem, Path(args.recipe).parent):
        print(line)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .train import main

    recipe = load_recipe(args.recipe, args.overrides)
    return main(recipe)


def cmd_validate(args: argparse.Namespace) -> int:
    from . import data, model
    from .recipe import load_recipe, resolve_batch

    recipe = load_recipe(args.recipe, args.overrides)
    base_dir = Path(args.recipe).parent
    print(f"recipe {args.recipe}: OK")
    print(
        f"  model: {recipe.model.name_or_path} ({recipe.quantization.method}, LoRA r={recipe.lora.r}, "
        f"alpha={recipe.lora.alpha}, targets={recipe.lora.target_modules})"
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"  batch: {resolve_batch(recipe.train, world).describe()}")
    print(f"  run directory: {recipe.run_dir}")
    tokenizer = model.load_tokenizer(recipe.model, base_dir)
    data.set_chat_template(tokenizer, recipe.data.chat_template, recipe.model.name_or_path, base_dir)
    prepared = data.build_data(recipe.data, tokenizer, recipe.run.seed, base_dir)
    print("data:")
    for line in prepared.report.lines():
        print(f"  {line}")
    print(
        f"  tokenizer: eos {tokenizer.eos_token!r}, pad {tokenizer.pad_token!r} (distinct from eos: "
        f"{tokenizer.pad_token_id != tokenizer.eos_token_id})"
    )
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    marks = ("\x1b[1;32m", "\x1b[0m") if color else ("[[", "]]")
    per_source, _ = data.load_examples(recipe.data.sources, recipe.data.on_bad_row, base_dir)
    shown = [ex for rows in per_source for ex in rows][: max(0, args.examples)]
    for ex in shown:
        tok = data.tokenize_example(
            ex, tokenizer, recipe.data.max_length, recipe.data.assistant_only_loss, keep_text=True
        )
        n_loss = sum(1 for x in tok.labels if x != -100)
        print(
            f"\nexample: {ex.source} row {ex.row} ({len(tok.input_ids)} tokens, {n_loss} trained"
            f"{', truncated' if tok.truncated else ''}); trained tokens are marked {marks[0]}like this{marks[1]}:"
        )
        print(data.mark_trained(tok, *marks))
    return 0


COMMANDS = {"train": cmd_train, "validate": cmd_validate, "plan": cmd_plan, "submit": cmd_submit}


def quiet_library_noise() -> None:
    """bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional hub-downloaded kernel
    is missing; the built-in kernel is used instead, so the warning only confuses."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_library_noise()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow the options (`plan R --gpus 8 train.x=1`).
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"qlora-sft {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"qlora-sft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
