"""Command-line arguments of a hostile but realistic user that no other file's area covers: each is
taken or refused naming the argument, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import recipe_dict, write_recipe

from qlora_sft import cli


def test_validate_examples_past_the_largest_index_shows_every_row(
    tiny_model: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """`validate --examples 99999999999999999999` ("show them all") raised islice's ValueError (a
    traceback) once the data had been read."""
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, toy_data, tmp_path / "runs"))
    assert cli.main(["validate", str(recipe), "--examples", "99999999999999999999"]) == 0
    assert capsys.readouterr().out.count("\nexample: ") == 160


def test_the_hub_kernel_bitsandbytes_asks_for_is_not_said_but_other_kernels_warnings_are(caplog):
    """transformers 5.25 brought the `kernels` package: with the hub offline, every command that imported
    bitsandbytes (on a CPU with AVX512-BF16) printed "Skipping publisher trust check for
    'kernels-community/quantization-bitsandbytes'..." above its own output. That record alone is dropped,
    also after `main` ran twice; the package's other warnings still reach the user."""
    import logging

    cli.quiet_library_noise()
    cli.quiet_library_noise()
    hub = logging.getLogger("kernels._internals.hf_hub")
    assert len([f for f in hub.filters if isinstance(f, cli._DropNaming)]) == 1
    with caplog.at_level(logging.WARNING, logger="kernels._internals.hf_hub"):
        hub.warning(
            "Skipping publisher trust check for '%s' because Hugging Face Hub is in offline mode.", cli.BNB_HUB_KERNEL
        )
        hub.warning(
            "Skipping publisher trust check for 'someone/other-kernel' because Hugging Face Hub is in offline mode."
        )
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "Skipping publisher trust check for 'someone/other-kernel' because Hugging Face Hub is in offline mode."
    ]


def test_an_option_value_that_starts_with_a_dash_says_to_join_it(capsys: pytest.CaptureFixture):
    """`export RUN --shard-size -5GB`: argparse reads -5GB as an option and said only "expected one
    argument". The error now says the value was read as an option and to write --shard-size=-5GB
    (which the size check then refuses, saying a shard size is above 0)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", "runs/x", "--shard-size", "-5GB"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --shard-size: expected one argument" in err
    assert "'-5GB' starts with '-' and was read as an option: write --shard-size=-5GB" in err
    # a value that is simply missing gets no such hint
    with pytest.raises(SystemExit):
        cli.main(["export", "runs/x", "--shard-size"])
    err = capsys.readouterr().err
    assert "expected one argument" in err and "starts with '-'" not in err


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"RANK": "1"}, True),  # (left exported in a shell: one process, nobody else says it)
        ({"RANK": "1", "WORLD_SIZE": "1"}, True),
        ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, True),
        ({"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, False),  # (rank 0 says it)
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "1"}, False),
    ],
    ids=["stray-rank", "world-of-one", "rank-0-of-2", "rank-1-of-2", "srun-rank-1"],
)
def test_ctrl_c_says_its_line_once_and_a_lone_process_always_says_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, env: dict[str, str], says: bool
):
    """A Ctrl-C ends with one line, said by rank 0 alone where a launcher started several ranks. A
    single process (export, chat, prepare) with RANK=1 left exported in its shell ended silently with
    exit 130: it took $RANK alone for a rank among others."""
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cli.say_interrupted("export", KeyboardInterrupt())
    assert (capsys.readouterr().err == "\nqlora-sft export: interrupted\n") is says


@pytest.mark.parametrize("ending", ["returns", "refuses", "interrupted"])
def test_a_command_takes_its_process_group_down_before_it_exits(ending: str, tmp_path: Path, monkeypatch):
    """A command that returned or refused destroys its process group itself: left to the
    interpreter's exit, gloo's threads aborted the process (SIGABRT, "terminate called without an
    active exception") about 1 exit in 4 right after a collective on two CPU ranks, and torchrun
    reported a crash instead of the exit code. After a Ctrl-C (a collective may be in flight) it is
    left alone."""
    import torch.distributed as dist

    from qlora_sft.errors import UserError

    def command(args: object) -> int:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        dist.broadcast_object_list([1], src=0)
        if ending == "refuses":
            raise UserError("refused")
        if ending == "interrupted":
            raise KeyboardInterrupt
        return 0

    monkeypatch.setitem(cli.COMMANDS, "validate", command)
    try:
        code = cli.main(["validate", str(tmp_path / "recipe.yaml")])
        assert code == {"returns": 0, "refuses": 2, "interrupted": 130}[ending]
        assert dist.is_initialized() == (ending == "interrupted")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("world", ["", " ", "abc", "2.5", "0", "-2"])
def test_a_world_size_that_is_no_number_of_processes_is_named(
    world: str, tiny_model: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
):
    """`export WORLD_SIZE=` (empty) or a stray value left in the shell: `validate` raised int()'s
    ValueError (a traceback) when it described the batch, and `train` on a GPU passed it on to
    torch and accelerate, which raise the same. Now the variable is named, with the fix, before
    anything loads; empty means unset (one process), as before."""
    from qlora_sft.errors import UserError
    from qlora_sft.launch import check_devices, stray_rank_variables

    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, toy_data, tmp_path / "runs"))
    monkeypatch.setenv("WORLD_SIZE", world)
    code = cli.main(["validate", str(recipe)])
    captured = capsys.readouterr()
    if not world.strip():
        assert code == 0 and "batch: " in captured.out, captured.err
        check_devices({"WORLD_SIZE": world}, cuda=True)
        assert stray_rank_variables({"WORLD_SIZE": world}) is None
        return
    assert code != 0 and "Traceback" not in captured.err
    assert f"WORLD_SIZE={world!r} is not a number of processes" in captured.err, captured.err
    assert "unset WORLD_SIZE RANK" in captured.err and "recipe " not in captured.out  # before the recipe loads
    assert cli.main(["train", str(recipe)]) == 2  # refused before the run directory exists
    assert "is not a number of processes" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    for cuda in (True, False):
        with pytest.raises(UserError, match="is not a number of processes"):
            check_devices({"WORLD_SIZE": world}, cuda=cuda)
    assert "is not a number of processes" in (stray_rank_variables({"WORLD_SIZE": world}) or "")


def test_launch_variables_torch_or_accelerate_would_refuse_late_are_named_first(
    tiny_model: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
):
    """Found by a hostile run: a LOCAL_RANK left in the shell (a tutorial's `export LOCAL_RANK=0`)
    made accelerate start a process group with no MASTER_ADDR (`train` and `export` ended in a
    traceback; empty or `abc`: int()'s ValueError), and ACCELERATE_USE_CPU=abc (or empty) raised
    accelerate's "invalid truth value" after the model had loaded. Now each is named with the fix
    before the recipe loads; what accelerate reads as yes or no (`on`, `1`) is read alike here."""
    from qlora_sft.errors import UserError
    from qlora_sft.launch import accelerate_flag, check_devices, check_launch_environment, distributed_state

    for env, what in (
        ({"LOCAL_RANK": "0"}, "LOCAL_RANK=0 is set, so this process would join a process group"),
        ({"LOCAL_RANK": ""}, "LOCAL_RANK='' is not a rank"),
        ({"LOCAL_RANK": "abc"}, "LOCAL_RANK='abc' is not a rank"),
        ({"ACCELERATE_USE_CPU": "abc"}, "ACCELERATE_USE_CPU='abc': accelerate reads it as yes or no"),
        ({"ACCELERATE_USE_CPU": ""}, "ACCELERATE_USE_CPU='': accelerate reads it as yes or no"),
        ({"ACCELERATE_USE_FSDP": "sure"}, "ACCELERATE_USE_FSDP='sure'"),
    ):
        with pytest.raises(UserError, match=re.escape(what)):
            check_launch_environment(env)
        with pytest.raises(UserError, match=re.escape(what)):
            check_devices(env, cuda=True)
    # set by a launcher, or with a MASTER_ADDR to meet at (one DeepSpeed process), or -1: no problem
    for env in (
        {"LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2"},
        {"LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "1"},
        {"LOCAL_RANK": "-1"},
    ):
        assert check_launch_environment(env) >= 1
    assert accelerate_flag("ACCELERATE_USE_CPU", {"ACCELERATE_USE_CPU": "on"})
    assert not accelerate_flag("ACCELERATE_USE_CPU", {"ACCELERATE_USE_CPU": "0"})
    assert not accelerate_flag("ACCELERATE_USE_CPU", {})
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    from accelerate import PartialState

    monkeypatch.setattr(PartialState, "_shared_state", {})  # (not yet created, as in a fresh `export`)
    with pytest.raises(UserError, match="LOCAL_RANK=0 is set"):
        distributed_state()  # (what export reaches first, through main_process_writes)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model, toy_data, tmp_path / "runs"))
    for command in ("validate", "train"):
        assert cli.main([command, str(recipe)]) == 2
        err = capsys.readouterr().err
        assert "LOCAL_RANK=0 is set" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_numbers_in_variables_are_read_as_int_reads_them(monkeypatch):
    """`str.isdigit()` takes superscripts (`²`) that int() refuses: QLORA_SFT_HEAD_TILE/HEAD_LEAD=² ended
    `train` in a traceback and SBATCH_NO_REQUEUE=² `submit`. A SLURM_RESTART_COUNT that is not a count
    (SLURM sets whole numbers) crashed the run lock; it counts as 0. A QLORA_SFT_CACHE of spaces made a
    folder named by them in the working directory."""
    import importlib

    from qlora_sft import checkpoint, files
    from qlora_sft.errors import UserError
    from qlora_sft.model import offload

    submit = importlib.import_module("qlora_sft.submit")

    for name, read in ((offload.HEAD_TILE_ENV, offload.head_tile), (offload.HEAD_LEAD_ENV, offload.head_lead)):
        with pytest.raises(UserError, match=f"{name}='²'"):
            read({name: "²"})
    assert not submit._flag_set("²") and submit._flag_set("1") and not submit._flag_set("0")
    for raw, count in (("3", 3), (" 2 ", 2), ("", 0), (" ", 0), ("abc", 0), ("1.5", 0), ("²", 0), ("-1", 0)):
        monkeypatch.setenv("SLURM_RESTART_COUNT", raw)
        assert checkpoint.slurm_restart_count() == count, raw
    monkeypatch.setenv("QLORA_SFT_CACHE", "  ")
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert files.user_cache_dir() == Path("/somewhere/qlora-sft")
