"""`qlora-sft chat` as a hostile but realistic user meets it: a prompt whose bytes are not UTF-8 (an
argument or stdin in another encoding), an empty prompt, a prompt longer than the model's context, a
model folder without its tokenizer or with a damaged shard header, Ctrl-C and EOF. Each is named
without a traceback, and nothing is written anywhere. The tiny model is the whole-model folder."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from qlora_sft import cli


def chat(capsys: pytest.CaptureFixture, path: Path, *args: str) -> tuple[int, str, str]:
    code = cli.main(["chat", str(path), "--device", "cpu", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_a_prompt_whose_bytes_are_not_utf8_is_named(tiny_model: Path, capsys: pytest.CaptureFixture):
    """`--prompt "$(cat notes-latin1.txt)"`: Python hands the bytes on as surrogates, and the tokenizer
    died in a TypeError traceback ("TextEncodeInput must be Union[...]") naming nothing."""
    code, _, err = chat(capsys, tiny_model, "--prompt", "caf\udce9", "--max-new-tokens", "2")
    assert code == 2 and "Traceback" not in err, err
    assert "chat: --prompt holds bytes that are not UTF-8 (caf\\xe9)" in err and "iconv" in err


def test_an_empty_prompt_is_refused(tiny_model: Path, capsys: pytest.CaptureFixture):
    """`--prompt "$PROMPT"` with PROMPT unset: the model answered an empty message."""
    code, out, err = chat(capsys, tiny_model, "--prompt", "  ", "--max-new-tokens", "2")
    assert code == 2 and "chat: --prompt is empty" in err and out == ""


def test_interactive_input_that_is_not_utf8_is_named_and_the_chat_goes_on(
    tiny_model: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """Lines piped in another encoding (stdin decoded with surrogateescape, as Python does outside a
    UTF-8 locale): the first such line ended the chat in a TypeError traceback."""
    raw = io.BytesIO(b"caf\xe9\nWhat is the colour of the sky?\n")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape"))
    code, out, err = chat(capsys, tiny_model, "--max-new-tokens", "2")
    assert code == 0 and "Traceback" not in err, err
    assert "chat: that line holds bytes that are not UTF-8 (caf\\xe9); it was not sent" in err
    assert out.count("> ") >= 3  # asked again after the bad line, answered the next, asked again


def test_a_prompt_longer_than_the_context_is_named(tiny_model: Path, capsys: pytest.CaptureFixture):
    """A prompt past max_position_embeddings (1024 for the tiny model): generation went on past the
    positions the model was trained for, silently, and answered noise."""
    code, out, err = chat(capsys, tiny_model, "--prompt", "alpha beta " * 200, "--max-new-tokens", "2")
    assert code == 2 and "Traceback" not in err, err
    assert "tokens, longer than the 1024 the model takes (max_position_embeddings" in err and out == ""
    code, out, err = chat(capsys, tiny_model, "--prompt", "alpha beta " * 135, "--max-new-tokens", "200")
    assert code == 0, err
    assert "--max-new-tokens 200 would run past the model's context of 1024 tokens" in err


def test_a_model_folder_without_a_tokenizer_is_named_before_the_model_loads(
    model_copy: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """A whole model folder from elsewhere (save_pretrained of the model alone): the model loaded,
    then a traceback about sentencepiece and tiktoken."""
    from transformers import AutoModelForCausalLM

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_copy / name).unlink(missing_ok=True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    code, _, err = chat(capsys, model_copy, "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 2 and "Traceback" not in err, err
    assert f"chat: {model_copy} has no tokenizer that loads" in err and "tokenizer.json" in err


def test_a_shard_whose_header_was_damaged_is_named(model_copy: Path, capsys: pytest.CaptureFixture):
    """Same size, other bytes in the header (a disk error, a bad copy): a raw SafetensorError traceback
    that names no file."""
    shard = model_copy / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[10:60] = b"z" * 50
    shard.write_bytes(bytes(raw))
    code, _, err = chat(capsys, model_copy, "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 2 and "Traceback" not in err, err
    assert f"chat: weight file {shard} is damaged (" in err


@pytest.mark.parametrize("ending", ["eof", "ctrl-c"])
def test_leaving_the_interactive_chat_writes_nothing(
    ending: str, model_copy: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    before = files_of(model_copy)
    lines = iter(["What is the colour of the sky?"])

    def typed(prompt: str = "") -> str:
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError if ending == "eof" else KeyboardInterrupt from None

    monkeypatch.setattr("builtins.input", typed)
    code, _, err = chat(capsys, model_copy, "--max-new-tokens", "2")
    assert code == (0 if ending == "eof" else 130) and "Traceback" not in err
    assert files_of(model_copy) == before


def test_device_cuda_without_a_gpu_is_named_before_the_model_loads(
    tiny_model: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """`--device cuda` on a login node or with a CPU-only torch: the model load died in torch's
    AssertionError traceback ("Torch not compiled with CUDA enabled")."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["chat", str(tiny_model), "--device", "cuda", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "chat: --device cuda, but no CUDA GPU is visible here" in err and "--device cpu" in err


def test_an_answer_piped_into_a_reader_that_closes_early_ends_quietly(
    tiny_model: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """`qlora-sft chat M --prompt ... | head -c 100`: head closed the pipe and the streamed answer died
    in a BrokenPipeError traceback."""
    import sys

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = cli.main(["chat", str(tiny_model), "--device", "cpu", "--prompt", "hello", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def split_in_two(folder: Path) -> list[Path]:
    """Save the folder's weights as two shards with their index, as save_pretrained does for a large model."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    keys = sorted(weights)
    shards = [folder / f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    for shard, names in zip(shards, halves, strict=True):
        save_file({k: weights[k] for k in names}, str(shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s.name for s, names in zip(shards, halves, strict=True) for k in names}}
    (folder / "model.safetensors.index.json").write_text(__import__("json").dumps(index))
    (folder / "model.safetensors").unlink()
    return shards


@pytest.mark.parametrize("damage", ["no weights", "a shard missing"])
def test_a_model_folder_without_its_weights_is_named(damage: str, model_copy: Path, capsys: pytest.CaptureFixture):
    """A model folder copied without its weights, or without one of the shards its index names (an
    interrupted rsync): OSError / FileNotFoundError tracebacks from transformers' loader."""
    if damage == "no weights":
        (model_copy / "model.safetensors").unlink()
        expected = f"chat: {model_copy} holds no .safetensors weights"
    else:
        split_in_two(model_copy)[1].unlink()
        expected = (
            f"chat: model.safetensors.index.json names 1 shard(s) not in {model_copy}: model-00002-of-00002.safetensors"
        )
    code, _, err = chat(capsys, model_copy, "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 2 and "Traceback" not in err, err
    assert expected in err


def refuse_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_a_model_without_a_chat_template_is_named_before_it_loads(
    model_copy: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """`chat` on a base model that was never chat-tuned (no chat template): the model loaded, then a
    ValueError traceback from apply_chat_template."""
    import json

    (model_copy / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model_copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_copy / "tokenizer_config.json").write_text(json.dumps(config))
    refuse_model(monkeypatch)
    code, _, err = chat(capsys, model_copy, "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 2 and "Traceback" not in err, err
    assert f"chat: {model_copy}'s tokenizer has no chat template" in err


def test_a_system_message_the_template_refuses_is_named_before_the_model_loads(
    model_copy: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """--system with a model whose template has no system role (Gemma's raises "System role not
    supported"): the model loaded, then a jinja2 TemplateError traceback."""
    (model_copy / "chat_template.jinja").write_text(
        '{% for m in messages %}{% if m.role == "system" %}{{ raise_exception("System role not supported") }}'
        "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    refuse_model(monkeypatch)
    code, _, err = chat(capsys, model_copy, "--prompt", "hi", "--system", "be brief", "--max-new-tokens", "2")
    assert code == 2 and "Traceback" not in err, err
    assert "chat template refuses the conversation (System role not supported)" in err and "--system" in err


def test_a_model_whose_rope_is_scaled_takes_the_scaled_context(model_copy: Path, capsys: pytest.CaptureFixture):
    """A model configured for a longer context by RoPE scaling (yarn, factor 4: Qwen2.5's long-context
    setting): validate allows data.max_length up to the scaled context, but chat refused any
    conversation past the unscaled max_position_embeddings."""
    import json

    config = json.loads((model_copy / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    (model_copy / "config.json").write_text(json.dumps(config))
    code, _out, err = chat(capsys, model_copy, "--prompt", "alpha beta " * 200, "--max-new-tokens", "2")
    assert code == 0, err
    code, _out, err = chat(capsys, model_copy, "--prompt", "alpha beta " * 900, "--max-new-tokens", "2")
    assert code == 2 and "longer than the 4096 the model takes" in err, err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prompt", "  "], "chat: --prompt is empty"),
        (["--prompt", "caf\udce9"], "chat: --prompt holds bytes that are not UTF-8 (caf\\xe9)"),
        (["--prompt", "hi", "--system", "caf\udce9"], "chat: --system holds bytes that are not UTF-8 (caf\\xe9)"),
    ],
)
def test_a_prompt_or_system_message_that_cannot_be_sent_is_named_before_the_model_loads(
    tiny_model: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str
):
    """An empty --prompt, or one whose bytes are not UTF-8, was refused only once the model had loaded
    (minutes for a large one); a --system message whose bytes are not UTF-8 passed and failed after
    the load in the tokenizer's TypeError traceback."""

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the model loaded before the refusal")

    monkeypatch.setattr(cli, "load_chat_model", no_load)
    code, out, err = chat(capsys, tiny_model, *args)
    assert code == 2 and "Traceback" not in err and out == "", err
    assert expected in err, err


@pytest.mark.parametrize("value", ["1e-38", "1e-300"])
def test_a_temperature_too_close_to_zero_is_refused_before_the_model_loads(
    tiny_model: Path, capsys: pytest.CaptureFixture, value: str
):
    """`--temperature 1e-38` divided the logits into infinities: torch.multinomial's RuntimeError
    ("probability tensor contains either inf, nan or element < 0"), a traceback after the model loaded."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["chat", str(tiny_model), "--prompt", "hi", "--temperature", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --temperature: '{value}'" in err and "give 0 for greedy answers" in err, err


def test_max_new_tokens_is_not_capped_at_slurms_largest_count(capsys: pytest.CaptureFixture):
    """`--max-new-tokens` shares the whole-number check of submit's counts. Was: that check gained
    submit's SLURM cap (65535), so `chat --max-new-tokens 70000` (a reasoning model's long answer) was
    refused "'70000' is more than SLURM takes"; submit's counts are still capped."""
    args = cli.build_parser().parse_args(["chat", "m", "--max-new-tokens", "70000"])
    assert args.max_new_tokens == 70000
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["chat", "m", "--max-new-tokens", "0"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["submit", "r.yaml", "--nodes", "70000"])
    assert "more than SLURM takes" in capsys.readouterr().err
