"""`qlora-sft train | validate | prepare | plan | submit | export | chat | plot` (the same CLI as
`python -m qlora_sft`)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError, first_line, interrupted
from .files import not_utf8


def gib(text: str) -> float:
    """A GPU's memory in GiB, for --gpu-mem: a finite number above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB (e.g. 24)") from None
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: give the GPU's memory in GiB, above 0 (e.g. 24)")
    return value


def _whole_number(text: str, least: int, hint: str, slurm: bool = True) -> int:
    """`slurm`: a count submit asks SLURM for (at most SLURM_COUNT_MAX)."""
    from .recipe import SLURM_COUNT_MAX

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text!r}: give {hint}")
    if slurm and value > SLURM_COUNT_MAX:  # (submitit makes one object per task; SLURM wraps counts past 16/32 bits)
        raise argparse.ArgumentTypeError(
            f"{text!r} is more than SLURM takes: give at most {SLURM_COUNT_MAX} (SLURM holds these counts in 16 "
            "or 32 bits and wraps a larger one)"
        )
    return value


def count(text: str) -> int:
    """A count of nodes, GPUs, tasks or CPUs: a whole number, 1 to SLURM_COUNT_MAX."""
    return _whole_number(text, 1, "1 or more")


def tokens(text: str) -> int:
    """A number of tokens (chat's --max-new-tokens): a whole number, 1 or more."""
    return _whole_number(text, 1, "1 or more", slurm=False)


def gpus(text: str) -> int:
    """GPUs per node for submit: 0 (CPU ranks) to SLURM_COUNT_MAX."""
    return _whole_number(text, 0, "0 (CPU ranks) or more")


def temperature(text: str) -> float:
    """A sampling temperature: a finite number, 0 (greedy) or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 (greedy) or a positive number such as 0.7")
    if 0 < value < 1e-6:  # the logits divided by it overflow into infinities near 1e-38: torch's RuntimeError
        raise argparse.ArgumentTypeError(
            f"{text!r} is so close to 0 that sampling overflows: give 0 for greedy answers, or 0.01 or more"
        )
    return value


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override recipe keys, values parsed as YAML (e.g. train.learning_rate=1e-4 run.name=try2)",
    )


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose "expected one argument" says so where the value was there but starts
    with '-' (`--shard-size -5GB`): argparse reads such a value as an option unless it is joined
    with `=`. The command's parser (made with this class too) records the arguments it parses."""

    _given: tuple[str, ...] = ()

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._given = tuple(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> Any:
        m = re.fullmatch(r"argument (\S+): expected one argument", message)
        if m:
            names = m.group(1).split("/")
            for given, value in zip(self._given, self._given[1:], strict=False):
                named = given in names or (given.startswith("--") and any(n.startswith(given) for n in names))
                if named and value.startswith("-") and value != "--":
                    joined = shlex.quote(f"{given}={value}")
                    message += f" ({value!r} starts with '-' and was read as an option: write {joined})"
                    break
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qlora-sft",
        description="One QLoRA supervised fine-tuning recipe, from one GPU to a SLURM cluster.",
    )
    from . import __version__

    parser.add_argument("--debug", action="store_true", help="show tracebacks for recipe and data errors")
    parser.add_argument("--version", action="version", version=f"qlora-sft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # --debug also after the command (`qlora-sft train R.yaml --debug`): SUPPRESS keeps the value
    # given before the command when it is not repeated after it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser(
        "train", parents=[common], help="fine-tune (as one process, or as a rank under accelerate launch)"
    )
    _recipe_args(p)

    p = sub.add_parser("validate", parents=[common], help="check the recipe and data without training; show an example")
    _recipe_args(p)
    p.add_argument("--examples", type=int, default=1, help="how many rendered examples to show")
    p.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="mark trained tokens in colour (default: on a terminal), else with [[ ]]",
    )
    p = sub.add_parser(
        "prepare",
        parents=[common],
        help="read, tokenize and cache the data once (all cores), before a launch; prints the validate report",
    )
    _recipe_args(p)
    p.add_argument("--rebuild", action="store_true", help="rebuild the cache even if one exists (data.rebuild)")
    p = sub.add_parser(
        "plan", parents=[common], help="what a launch will do: world size, batch arithmetic, memory per GPU"
    )
    _recipe_args(p)
    p.add_argument(
        "--config", help="the launch's accelerate config (YAML) or DeepSpeed config (JSON) (default: one process)"
    )
    p.add_argument("--gpus", type=count, help="GPUs (processes) per node (default: the config's num_processes)")
    p.add_argument("--nodes", type=count, help="number of nodes (default: the config's num_machines, else 1)")
    p.add_argument("--gpu-mem", type=gib, help="GPU memory in GiB: list which bundled configs fit")
    p.add_argument("--run-dir", action="store_true", help="only print the run directory (for scripts)")
    p = sub.add_parser("submit", parents=[common], help="submit the recipe with submitit (SLURM, or --cluster local)")
    _recipe_args(p)
    p.add_argument("--nodes", type=count)
    p.add_argument("--gpus-per-node", type=gpus)
    p.add_argument("--tasks-per-node", type=count, help="ranks per node (default: GPUs per node, or 1)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--cpus-per-task", type=count)
    p.add_argument("--mem")
    p.add_argument("--constraint")
    p.add_argument("--extra-sbatch", action="append", help="another sbatch option, e.g. --extra-sbatch=--exclusive")
    p.add_argument("--cluster", choices=["slurm", "local"], help="default: slurm where sbatch exists, else local")
    p.add_argument("--folder", help="submitit job folder (default <output_dir>/<name>.submitit/<job id>)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.add_argument("--deepspeed", metavar="X.json", help="train with this DeepSpeed config (as train.deepspeed=X.json)")
    p.add_argument(
        "--prepare",
        action="store_true",
        help="prepare (tokenize, cache) the data here first: data errors before queueing",
    )
    p = sub.add_parser(
        "export", parents=[common], help="merge the adapter into the base: one folder that loads with transformers"
    )
    p.add_argument("path", help="run directory (final/ or newest complete checkpoint), checkpoint or adapter folder")
    p.add_argument("--out", help="output folder (default <run dir>/merged)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"])
    p.add_argument(
        "--base",
        choices=["dequantized", "original"],
        help="merge onto the base as training saw it (default when trained in 4/8 bit) or the original",
    )
    p.add_argument("--base-model", help="base model folder or hub id (default: the run's model.name_or_path)")
    p.add_argument(
        "--allow-other-base",
        action="store_true",
        help="merge even though the base model's files differ from those the adapter trained on (the same "
        "weights saved in other files)",
    )
    p.add_argument("--shard-size", default="5GB", help="maximum size of an output shard (e.g. 5GB, 500MB)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-verify", action="store_true", help="skip the logit check")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the verified merged folder (token: HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--revision", help="with --push-to-hub: upload to this branch")
    p.add_argument("--adapter-only", action="store_true", help="with --push-to-hub: upload the adapter, no merge")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the base model's own code (auto_map) to run; a run's recipe.yaml cannot allow it",
    )

    p = sub.add_parser("plot", parents=[common], help="draw the loss curves of one or more runs into a PNG")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help="PNG to write (default: <run>/logs/loss.png for one run, loss.png for several)")
    p = sub.add_parser("chat", parents=[common], help="talk to a merged model or an adapter (interactive, or --prompt)")
    p.add_argument(
        "path",
        help="merged model folder, adapter folder (final/, a checkpoint), or run directory (its merged/, else its "
        "final/ or newest complete checkpoint)",
    )
    p.add_argument(
        "--base-model",
        help="with an adapter: the base model folder or hub id (default: the run's model.name_or_path), e.g. "
        "where the base moved",
    )
    p.add_argument(
        "--allow-other-base",
        action="store_true",
        help="load the adapter even though the base model's files differ from those it trained on",
    )
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=tokens, default=256)
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own code (auto_map) to run; a run's recipe.yaml cannot allow it",
    )
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    if not args.push_to_hub and (args.private or args.revision or args.adapter_only):
        raise UserError("export: --private, --revision and --adapter-only go with --push-to-hub ORG/NAME")
    from .checkpoint import main_process_writes
    from .export import HubTarget, export
    from .train import setup_logging

    setup_logging(True)
    hub = None
    if args.push_to_hub:
        hub = HubTarget(args.push_to_hub, args.private, args.revision, args.adapter_only)
    result = None
    with main_process_writes() as is_main:  # other ranks of an accelerate launch only wait
        if is_main:
            result = export(
                args.path,
                args.out,
                dtype=args.dtype,
                base=args.base,
                base_model=args.base_model,
                shard_size=args.shard_size,
                device=args.device,
                overwrite=args.overwrite,
                verify=not args.no_verify,
                hub=hub,
                trust_remote_code=args.trust_remote_code,
                other_base=args.allow_other_base,
            )
    if result is None:
        return 0
    if result.uploaded_to and result.merged_vs_trained is None:
        print(f"adapter uploaded: {result.uploaded_to}")
        return 0
    print(
        f"merged model: {result.out} ({result.shards} shard(s), {result.seconds:.1f} s, peak RSS during the merge "
        f"{result.merge_peak_rss_mb:.0f} MB)"
    )
    if result.merged_vs_trained is not None:
        print(f"  merged vs adapter on the training-time base: {result.merged_vs_trained.line()}")
    if result.original_vs_trained is not None:
        print(f"  original base + adapter vs the training-time model: {result.original_vs_trained.line()}")
    if result.uploaded_to:
        print(f"uploaded: {result.uploaded_to}")
    return 0 if result.ok else 1


def load_chat_model(
    path: str,
    device: str,
    trust_remote_code: bool = False,
    base_model: str | None = None,
    other_base: bool = False,
    system: str | None = None,
) -> tuple[Any, Any]:
    """A merged folder, an adapter (+ its base), or a run directory (merged/ if exported, else final/,
    else its newest complete checkpoint, as `export` picks). The adapter's base model is checked as
    `export` checks it (there, and the model it trained on) before anything loads; `base_model`
    (--base-model) replaces the recorded one. A model's own code runs only with `trust_remote_code`
    (the command's flag)."""
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.exists():
        raise UserError(
            f"chat: {p} does not exist. Give a merged model folder (qlora-sft export writes <run>/merged), an adapter "
            "folder (a run's final/ or checkpoint-<step>/) or a run directory."
        )
    from .export import check_utf8_path

    check_utf8_path(p, "the path", "chat")
    run_dir = None
    run = (p / "recipe.yaml").is_file()
    if run and base_model is None and (p / "merged" / "config.json").is_file():
        older = older_export(p, p / "merged")
        if older:
            print(older, file=sys.stderr)
        run_dir, p, run = p, p / "merged", False  # a whole model from here on
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():  # before the model: torch's AssertionError
        raise UserError(
            f"chat: --device cuda, but no CUDA GPU is visible here (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, torch {torch.__version__}). Run it on a GPU node, "
            "or use --device cpu (slower)."
        )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if run or (p / "adapter_config.json").is_file():
        # the adapter on its base as training loaded it (the recipe's quantization), not on the
        # full-precision base: that is another model (see docs/export.md)
        import dataclasses

        from peft import PeftModel

        from .export import base_model_files, resolve_source
        from .launch import LaunchMode
        from .model import load_base

        source = resolve_source(p, base_model, trust_remote_code=trust_remote_code, command="chat")
        if run and source.adapter_dir.name != "final":
            print(
                f"chat: {p} has no complete final/ adapter yet: using its newest complete checkpoint "
                f"{source.adapter_dir}",
                file=sys.stderr,
            )
        base_model_files(source, other_base, command="chat")  # there, and the model it trained on
        p = source.adapter_dir
        tokenizer = chat_tokenizer(p, trust_remote_code, system)  # before the base model loads
        recipe = source.recipe
        recipe = dataclasses.replace(
            recipe,
            model=dataclasses.replace(recipe.model, name_or_path=source.base_path, revision=source.base_revision),
        )
        mode = LaunchMode("cpu" if device == "cpu" else "single_gpu")
        model = PeftModel.from_pretrained(load_base(recipe, mode, compute_dtype=dtype), p)
        return model.eval(), tokenizer
    elif (p / "config.json").is_file():
        if base_model is not None:
            raise UserError(f"chat: --base-model goes with an adapter; {p} is a whole model (config.json)")
        from .export import EXPORT_MARKER, export_damage

        again = (
            f"Export it again: qlora-sft export {run_dir} --overwrite"
            if run_dir
            else f"Export it again: qlora-sft export <adapter> --out {p} --overwrite (its adapter: {p}/{EXPORT_MARKER})"
            if (p / EXPORT_MARKER).is_file()
            else "Copy the model folder again from where it came from"
        )
        from .model.load import weight_files_problem

        damage = export_damage(p) or (weight_files_problem(p) or (None,))[0]
        if damage:
            raise UserError(f"chat: {damage} (damaged or cut short since). {again}")
        tokenizer = chat_tokenizer(p, trust_remote_code, system)  # before the model: a folder without one is named
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=dtype, device_map={"": device}, trust_remote_code=trust_remote_code
        )
        return model.eval(), tokenizer
    else:
        raise UserError(
            f"chat: {p} is neither a model folder (config.json) nor an adapter folder (adapter_config.json) nor a run "
            "directory (recipe.yaml). Give a merged model folder, an adapter folder or a run directory."
        )


def chat_tokenizer(folder: Path, trust_remote_code: bool, system: str | None = None) -> Any:
    """The tokenizer saved with the model or adapter in `folder` (export and training save it there),
    its chat template tried on a first message (with --system's): a folder without a tokenizer that
    loads, a tokenizer without a chat template, or a template that refuses the conversation (no
    system role) is named before the model loads."""
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(
            f"chat: {folder} has no tokenizer that loads ({first_line(exc)[:200]}). Copy the tokenizer files of the "
            "model it came from (tokenizer.json, tokenizer_config.json, chat_template.jinja) into it, or export "
            "the run again (qlora-sft export RUN --overwrite)"
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"chat: {folder}'s tokenizer has no chat template (chat_template.jinja, or chat_template in "
            "tokenizer_config.json): a base model that was never chat-tuned. Chat with a run's adapter or merged "
            "model (they carry the template training used), or add a template to the folder."
        )
    probe = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": "hi"}]
    try:
        tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        hint = " (leave --system out, or put it into the prompt)" if system else ""
        raise UserError(
            f"chat: {folder}'s chat template refuses the conversation ({first_line(exc)[:200]}){hint}"
        ) from None
    return tokenizer


def older_export(run_dir: Path, merged: Path) -> str | None:
    """What to say when a run's merged/ was exported from another step than the run's newest adapter
    (training went on after the export); None when it is the same step, or cannot be told."""
    import json

    from .export import EXPORT_MARKER, resolve_source

    try:
        marker = json.loads((merged / EXPORT_MARKER).read_text())
        newest = resolve_source(run_dir, command="chat", quiet=True)  # (what it says of final/ is said here)
    except (OSError, ValueError, UserError):
        return None
    adapter, step = newest.adapter_dir, newest.step
    if newest.newer is not None:  # a relaunch training longer keeps the old final/
        adapter, step = newest.newer.path, newest.newer.step
    if not isinstance(marker, dict) or marker.get("step") == step:
        return None
    again = f"export the run again (qlora-sft export {run_dir} --overwrite), or "
    again = again if adapter == newest.adapter_dir else ""  # (it exports final/ again)
    return (
        f"chat: {merged} was exported from {marker.get('adapter')} (step {marker.get('step')}); the run's newest "
        f"adapter is {adapter} (step {step}). Chatting with {merged}; {again}give {adapter} to chat with that "
        "adapter."
    )


def check_chat_text(args: argparse.Namespace) -> None:
    """--prompt and --system, before the model loads: an empty prompt (`--prompt "$PROMPT"` with
    PROMPT unset), and bytes that are not UTF-8 (Python hands them on as surrogates, which the
    tokenizer refuses with a TypeError)."""
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("chat: --prompt is empty: give the message to answer, or leave --prompt out to chat")
    for flag, text in (("--prompt", args.prompt), ("--system", args.system)):
        shown = not_utf8(text) if text is not None else None
        if shown:
            raise UserError(
                f"chat: {flag} holds bytes that are not UTF-8 ({shown}): give it as UTF-8 text "
                "(e.g. iconv -f latin1 -t utf-8 FILE)"
            )


def cmd_chat(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    check_chat_text(args)  # before minutes of loading
    model, tokenizer = load_chat_model(
        args.path, args.device, args.trust_remote_code, args.base_model, args.allow_other_base, args.system
    )
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    from .model.load import model_context

    config = model.config.to_dict()
    context, key = model_context(config)
    unscaled = model_context({k: v for k, v in config.items() if k not in ("rope_scaling", "rope_parameters")})[0]
    said = f"{key} in its config.json" + (", RoPE-scaled" if context != unscaled else "")

    def answer(text: str) -> str:
        from jinja2.exceptions import TemplateError

        try:
            ids = tokenizer.apply_chat_template(
                [*messages, {"role": "user", "content": text}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            ).to(model.device)
        except TemplateError as exc:  # a template with rules on the turns (checked on a first message)
            raise UserError(
                f"chat: the model's chat template refuses the conversation ({first_line(exc)[:200]})"
            ) from None
        length = int(ids["input_ids"].shape[1])
        new_tokens = args.max_new_tokens
        if isinstance(context, int) and length >= context:  # past the positions the model knows: noise
            raise UserError(
                f"chat: the conversation is {length} tokens, longer than the {context} the model takes "
                f"({said}): give a shorter prompt"
                + ("" if args.prompt is not None else ", or start a new chat (the earlier turns count too)")
            )
        if isinstance(context, int) and length + new_tokens > context:
            new_tokens = context - length
            print(
                f"chat: --max-new-tokens {args.max_new_tokens} would run past the model's context of {context} tokens "
                f"(the conversation is {length}): the answer stops after {new_tokens}",
                file=sys.stderr,
            )
        messages.append({"role": "user", "content": text})
        sampling = (
            {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
        )
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=new_tokens,
                streamer=streamer,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                **sampling,
            )
        reply = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        return reply

    try:
        return converse(args, answer)
    except BrokenPipeError:  # `chat ... | head`: the reader has what it wanted
        try:  # (and the interpreter's last flush of stdout finds nothing to write)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0


def converse(args: argparse.Namespace, answer: Any) -> int:
    """One answer (--prompt) or the interactive loop, with `answer(text)` streaming each reply."""
    if args.prompt is not None:  # (checked by check_chat_text before the model loaded)
        answer(args.prompt)
        return 0
    print("qlora-sft chat: type a message, Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError as exc:  # stdin read strictly as UTF-8 (a UTF-8 locale)
            print(f"chat: that line holds bytes that are not UTF-8 ({exc.reason}); it was not sent", file=sys.stderr)
            continue
        if not_utf8(text):
            print(
                f"chat: that line holds bytes that are not UTF-8 ({not_utf8(text)}); it was not sent", file=sys.stderr
            )
            continue
        if text.strip():
            try:
                answer(text)
            except UserError as exc:  # a message past the context: this chat goes on without it
                print(exc, file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    from .submit import interrupted_wait_note, submit, wait_for

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
        prepare=args.prepare,
        deepspeed=args.deepspeed,
    )
    print(f"submitted job {job.job_id}")
    print(f"  job folder: {job.paths.folder}")
    print(f"  stdout:     {job.paths.stdout}")
    print(f"  stderr:     {job.paths.stderr}")
    if args.wait:
        try:
            result = wait_for(job)
        except KeyboardInterrupt as exc:  # the job goes on (or not): the CLI's one line says which
            exc.add_note(interrupted_wait_note(job))
            raise
        print(f"result: {result}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import plan_lines
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    check_named_files(recipe, Path(args.recipe).parent)
    if args.run_dir:
        from .files import link_loop

        loop = link_loop(recipe.run_dir)
        if loop is not None:
            raise UserError(
                f"plan: run.output_dir {recipe.run.output_dir}: the run directory {recipe.run_dir} goes through a "
                f"symbolic link loop ({loop}: its links lead back to themselves; `ls -l {loop}` shows where it "
                "points). Fix the link, or choose another run.output_dir (run.output_dir=PATH after the recipe)"
            )
        print(recipe.run_dir.resolve())
        return 0
    for line in plan_lines(recipe, args.config, args.gpus, args.nodes, args.gpu_mem, Path(args.recipe).parent):
        print(line)
    return 0


def check_named_files(recipe: Any, base_dir: Path) -> None:
    """The files a recipe names besides its data, checked before anything loads: its DeepSpeed JSON
    (`train.deepspeed`) against the recipe, the adapter of `lora.init_from`, and that
    `checkpoint.resume` names a checkpoint."""
    from .errors import RecipeError
    from .init_adapter import check_before_loading
    from .launch_config import recipe_problems

    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError(problems, recipe.source)
    check_before_loading(recipe, base_dir)


def cmd_train(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .train import main

    recipe = load_recipe(args.recipe, args.overrides)
    return main(recipe)


def _data_report(recipe: Any, base_dir: Path, tokenizer: Any, keep: bool) -> list[str]:
    """The data report of `validate` (keep=False: the cache if one exists, else built and dropped)
    and `prepare` (keep=True: built into the run's cache, or found there)."""
    import time

    from . import data
    from .data.cache import other_caches

    cache_root = recipe.data_cache_root
    folder = data.cache_folder(recipe.data, tokenizer, recipe.run.seed, cache_root, base_dir)
    start = time.perf_counter()
    prepared = None if recipe.data.rebuild else data.load_prepared(folder)  # data.rebuild: never the old one
    if prepared is not None:
        prepared.found = True
        where = prepared.origin()
    elif recipe.data.streaming:
        prepared = data.stream_data(recipe.data, tokenizer, recipe.run.seed, base_dir)
        where = prepared.origin()
    elif keep:
        prepared = data.prepare_data(recipe.data, tokenizer, recipe.run.seed, cache_root, base_dir, by="prepare")
        where = f"{prepared.origin()}; `train` finds it there"
    else:
        prepared = data.build_data(recipe.data, tokenizer, recipe.run.seed, base_dir)
        where = f"not cached (built in {time.perf_counter() - start:.1f} s; `qlora-sft prepare` keeps it for training)"
    data.check_end_tokens(prepared.report, recipe.data)
    data.check_eval_rows(prepared.report, recipe.data, recipe.train.args)
    return [*prepared.report.lines(), f"data: {where}", *(f"note: {line}" for line in other_caches(folder))]


def _recipe_header(args: argparse.Namespace) -> tuple[Any, Path, Any]:
    """Load the recipe, print its summary, and load the tokenizer with the recipe's chat template."""
    from . import model
    from .launch import check_launch_environment
    from .plan import check_data_readable
    from .recipe import load_recipe, recipe_warnings, resolve_batch

    world = check_launch_environment()  # (train would refuse them; the batch is described for `world`)
    rebuild = ["data.rebuild=true"] if getattr(args, "rebuild", False) else []
    recipe = load_recipe(args.recipe, [*args.overrides, *rebuild])
    base_dir = Path(args.recipe).parent
    check_named_files(recipe, base_dir)
    check_data_readable(recipe.data, base_dir)
    print(f"recipe {args.recipe}: OK")
    print(
        f"  model: {recipe.model.name_or_path} ({recipe.quantization.method}, LoRA r={recipe.lora.r}, "
        f"alpha={recipe.lora.alpha}, targets={recipe.lora.target_modules})"
    )
    print(f"  batch: {resolve_batch(recipe.train, world).describe()}")
    print(f"  run directory: {recipe.run_dir}")
    for warning in recipe_warnings(recipe):
        print(f"  warning: {warning}")
    return recipe, base_dir, model.recipe_tokenizer(recipe, base_dir)


def cmd_validate(args: argparse.Namespace) -> int:
    import itertools

    from . import data

    recipe, base_dir, tokenizer = _recipe_header(args)
    print("data:")
    for line in _data_report(recipe, base_dir, tokenizer, keep=False):
        print(f"  {line}")
    print(
        f"  tokenizer: eos {tokenizer.eos_token!r}, pad {tokenizer.pad_token!r} (distinct from eos: "
        f"{tokenizer.pad_token_id != tokenizer.eos_token_id})"
    )
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    marks = ("\x1b[1;32m", "\x1b[0m") if color else ("[[", "]]")
    rows = itertools.chain.from_iterable(
        data.iter_examples(
            src,
            recipe.data.on_bad_row,
            data.SourceReport(src.path, src.format),
            base_dir,
            recipe.data.assistant_only_loss,
        )
        for src in recipe.data.sources
    )
    for ex in itertools.islice(rows, min(max(0, args.examples), sys.maxsize)):  # (islice refuses more)
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


def cmd_prepare(args: argparse.Namespace) -> int:
    from .train import setup_logging

    setup_logging(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe, base_dir, tokenizer = _recipe_header(args)
    print("data:")
    for line in _data_report(recipe, base_dir, tokenizer, keep=True):
        print(f"  {line}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .files import link_loop, write_problem
    from .plots import draw, drawn_here

    runs = [Path(r) for r in args.runs]
    for run in runs:
        if run.is_file():
            if run.suffix.lower() in (".yaml", ".yml"):
                raise UserError(
                    f"plot: {run} is a recipe file, not a run directory; give the run directory it trains into "
                    f"(`qlora-sft plan {run} --run-dir` prints it)"
                )
            raise UserError(f"plot: {run} is a file, not a run directory; give the run's folder (it holds logs/)")
    default = runs[0] / "logs" / "loss.png" if len(runs) == 1 else Path("loss.png")
    out = Path(args.out) if args.out else default
    loop = link_loop(out)
    if loop is not None:
        raise UserError(
            f"plot: --out {out} goes through a symbolic link loop ({loop}: its links lead back to themselves; "
            f"`ls -l {loop}` shows where it points); it was left as it is. Fix the link, or pass --out with another "
            "name."
        )
    if out.is_dir():
        raise UserError(f"plot: --out {out} is a folder; give the PNG file to write (e.g. {out / 'loss.png'})")
    if out.suffix.lower() != ".png":
        stem = out.name.rstrip(".") if out.name.endswith(".") else out.stem  # `curve.`: curve
        if not stem or out.name.lower() == ".png":  # `.png` (pathlib: no suffix), `...`: no name before .png
            raise UserError(f"plot: --out {out}: the file needs a name before .png (e.g. {out.with_name('loss.png')})")
        png = out.with_name(f"{stem}.png")
        raise UserError(f"plot: --out {out}: plot writes a PNG image; name the file .png (e.g. {png})")
    if out.is_symlink():
        if not out.exists():
            raise UserError(
                f"plot: --out {out} is a symbolic link to {os.readlink(out)}, which does not exist; it was left as "
                "it is. Pass --out with the file to write, or fix the link."
            )
        out = Path(os.path.realpath(out))  # the plot is drawn where the link points, and the link stays
    if out.exists() and not drawn_here(out):
        raise UserError(
            f"plot: {out} exists and is not a plot qlora-sft drew; it was left as it is. Pass --out with another "
            "name, or remove it."
        )
    problem = write_problem(out.parent)
    if problem:
        raise UserError(f"plot: cannot write {out}: {problem}. Pass --out PATH.png in a writable folder.")
    print(draw(runs, out))
    return 0


COMMANDS = {
    "train": cmd_train,
    "validate": cmd_validate,
    "prepare": cmd_prepare,
    "plan": cmd_plan,
    "submit": cmd_submit,
    "export": cmd_export,
    "chat": cmd_chat,
    "plot": cmd_plot,
}


# the optional CPU kernel bitsandbytes asks the hub's `kernels` package for when it is imported
BNB_HUB_KERNEL = "kernels-community/quantization-bitsandbytes"


class _DropNaming(logging.Filter):
    """Drops the records whose message names `text`; every other record passes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_library_noise() -> None:
    """bitsandbytes, imported on a CPU with AVX512-BF16, asks for an optional hub-downloaded kernel
    (`BNB_HUB_KERNEL`) and warns where it is missing; the built-in kernel is used instead, so the
    warning only confuses. Where the `kernels` package is installed (transformers 5.25 requires it)
    and the hub is offline, `kernels` also warns that it skipped that kernel's publisher check: that
    record alone is dropped, its other warnings pass."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    hub = logging.getLogger("kernels._internals.hf_hub")
    if not any(isinstance(f, _DropNaming) for f in hub.filters):
        hub.addFilter(_DropNaming(BNB_HUB_KERNEL))


# the commands that load a quantized model (and so import bitsandbytes)
LOADS_MODEL = ("train", "export", "chat")


def import_bitsandbytes_without_compiling() -> None:
    """Import bitsandbytes with `torch.compile` deferred to first call. bitsandbytes applies
    `torch.compile` to its CPU fallback kernels when it is imported, and that call imports torch's
    inductor compiler (about 3 s of every training process's start on two CPU cores) although no
    kernel is compiled until one runs, which on a GPU is never. Deferred, the first call compiles
    exactly as before. Modules (not plain functions) are compiled as usual."""
    if "bitsandbytes" in sys.modules:
        return
    import functools

    import torch

    compile_now = torch.compile

    def compile_on_first_call(model: Any = None, **kwargs: Any) -> Any:
        if model is None:  # used as @torch.compile(...)
            return lambda fn: compile_on_first_call(fn, **kwargs)
        if isinstance(model, torch.nn.Module) or not callable(model):
            return compile_now(model, **kwargs)
        compiled: Any = None

        @functools.wraps(model)
        def call(*args: Any, **kw: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **kwargs)
            return compiled(*args, **kw)

        return call

    torch.compile = compile_on_first_call
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass  # reported where the model loads
    finally:
        torch.compile = compile_now


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
        if args.command in LOADS_MODEL:
            from .launch import default_allocator_settings

            default_allocator_settings()  # before torch touches CUDA
            import_bitsandbytes_without_compiling()
        code = COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        if not said_by_another_rank(exc):  # (rank 0 says what all ranks met)
            print(f"qlora-sft {args.command}: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt as exc:
        say_interrupted(args.command, exc)
        return 130
    except Exception as exc:
        if not interrupted(exc) or args.debug:
            raise
        say_interrupted(args.command, exc)  # a library's clean-up raised over Ctrl-C
        return 130
    # (not after a crash or a Ctrl-C: a collective may be in flight there)
    from .launch import end_process_group

    end_process_group()
    return code


def said_by_another_rank(exc: UserError) -> bool:
    """Whether another process says `exc`: an error every rank raised alike (`UserError.everywhere`) is
    said by rank 0 of the process group alone. The process group's rank, not $RANK: such errors are
    raised once the group has formed, and a single process (no group) with RANK=1 left exported in its
    shell has no rank 0 beside it to say it."""
    return exc.everywhere and group_rank() not in (None, 0)


def group_rank() -> int | None:
    """This process's rank in the process group, or None where none has formed (torch.distributed not
    even imported: no group)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


def say_interrupted(command: str, exc: BaseException) -> None:
    """Print the line a Ctrl-C ends with, from rank 0 alone where a launcher (torchrun, accelerate
    launch) started several ranks: the launcher passes the Ctrl-C on to every rank, and each would
    print the same line. The other ranks still exit 130. The process group's rank where it has formed;
    before, $RANK where a launcher set it for several ranks (a RANK left exported in the shell of a
    single process is no rank among others: it says its line)."""
    rank = group_rank()
    if rank is not None:
        other = rank != 0
    else:
        from .launch import launcher_started, world_size_variable

        several = (world_size_variable() or 1) > 1
        other = several and launcher_started() and os.environ.get("RANK", "0") not in ("", "0")
    if not other:
        print(interrupted_line(command, exc), file=sys.stderr)


def interrupted_line(command: str, exc: BaseException) -> str:
    """The one line a Ctrl-C ends with, on a line of its own (a progress bar may have left the cursor
    mid-line): with what the command noted on the exception (`train`: the run and what resumes it)."""
    notes = " ".join(getattr(exc, "__notes__", None) or [])
    return f"\nqlora-sft {command}: interrupted" + (f". {notes}" if notes else "")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
