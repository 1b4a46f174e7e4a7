"""`qlora-sft plot` as users run it: while the run trains (the training redraws the same PNG), into a
folder that holds their own figures, on a full disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_with_file_limit
from PIL import Image

from qlora_sft import cli
from qlora_sft.files import write_problem


def fake_run(root: Path, name: str = "run", steps: int = 30) -> Path:
    run = root / name
    (run / "logs").mkdir(parents=True)
    lines = [f'{{"step": {s}, "loss": {3.0 - s / 20}, "learning_rate": 0.0001}}' for s in range(1, steps + 1)]
    (run / "logs" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


REDRAW = """
import sys
from pathlib import Path
from qlora_sft.plots import draw
run = Path(sys.argv[1])
for _ in range(8):
    draw([run], run / "logs" / "loss.png")
"""


def test_two_plots_of_one_run_at_once_both_finish(tmp_path: Path):
    """The training redraws logs/loss.png at each save while the user runs `qlora-sft plot RUN`, which
    writes the same file: both went through one temporary name, and one rename failed
    (FileNotFoundError, a traceback for the user)."""
    run = fake_run(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    procs = [
        subprocess.Popen([sys.executable, "-c", REDRAW, str(run)], stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    failed = [err for p in procs if (err := p.communicate(timeout=300)[1]) and p.returncode != 0]
    assert failed == []
    with Image.open(run / "logs" / "loss.png") as im:
        assert im.format == "PNG"
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["loss.png", "metrics.jsonl"]


def test_plot_never_replaces_a_picture_it_did_not_draw(tmp_path: Path, capsys: pytest.CaptureFixture):
    """With several runs the default is ./loss.png: a user's own loss.png there was replaced without a
    word. A plot qlora-sft drew is replaced; any other file is refused, named, and left as it was."""
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b")
    theirs = tmp_path / "loss.png"
    Image.new("RGB", (8, 8), "red").save(theirs)
    before = theirs.read_bytes()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert cli.main(["plot", str(a), str(b)]) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert f"{Path('loss.png')} exists and is not a plot qlora-sft drew" in err and "--out" in err
    assert theirs.read_bytes() == before
    # one it drew is replaced, by default or by --out
    assert cli.main(["plot", str(a), str(b), "--out", str(tmp_path / "two.png")]) == 0
    assert cli.main(["plot", str(a), "--out", str(tmp_path / "two.png")]) == 0
    # and a run's own logs/loss.png, drawn by versions that marked nothing, is still replaced
    Image.new("RGB", (8, 8), "blue").save(a / "logs" / "loss.png")
    assert cli.main(["plot", str(a)]) == 0
    with Image.open(a / "logs" / "loss.png") as im:
        assert im.size[0] > 400


def test_a_full_disk_while_plotting_is_named_and_leaves_no_temporary_file(tmp_path: Path):
    """A write that fails half-way (here a file size limit, as a full disk) left `.loss.png.tmp.png`
    behind, with a traceback."""
    run = fake_run(tmp_path)
    res = cli_with_file_limit("plot", str(run), fsize=2048, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert f"plot: writing {run / 'logs' / 'loss.png'}" in res.stderr and "file too large" in res.stderr
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["metrics.jsonl"]


def test_a_metrics_line_with_an_infinite_step_is_left_out_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
):
    """An edited metrics.jsonl line whose step is 1e400 (JSON reads it as infinity) raised OverflowError
    (a traceback) where every other unreadable line is left out and named."""
    run = fake_run(tmp_path, steps=3)
    with (run / "logs" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1e400, "loss": 1.0}\n')
    assert cli.main(["plot", str(run)]) == 0
    assert "left out 1 line(s)" in caplog.text and "(line 4)" in caplog.text, caplog.text
    assert (run / "logs" / "loss.png").is_file()


def test_a_run_that_has_logged_no_step_yet_is_named_not_drawn_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
):
    """A run whose logs/metrics.jsonl is still empty (no step logged yet) drew an empty figure and
    exited 0 without a word. Alone it is refused, naming the file, and nothing is written; beside
    runs that have logged, it is left out with a warning naming it, and they are drawn."""
    fresh = fake_run(tmp_path, "fresh", steps=0)
    (fresh / "logs" / "metrics.jsonl").write_text("")
    assert cli.main(["plot", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert f"{fresh / 'logs' / 'metrics.jsonl'} holds no logged step yet" in err and "nothing was written" in err
    assert sorted(p.name for p in (fresh / "logs").iterdir()) == ["metrics.jsonl"]
    trained = fake_run(tmp_path, "trained")
    out = tmp_path / "both.png"
    assert cli.main(["plot", str(fresh), str(trained), "--out", str(out)]) == 0
    assert f"{fresh / 'logs' / 'metrics.jsonl'} holds no logged step yet" in caplog.text
    assert f"{fresh} is left out" in caplog.text
    assert out.is_file()
    # a run directory without metrics.jsonl (a typo, not a run) is still refused, with others too
    assert cli.main(["plot", str(tmp_path / "nosuch"), str(trained), "--out", str(out)]) == 2


def test_plot_out_through_a_link_keeps_the_link(tmp_path: Path, capsys: pytest.CaptureFixture):
    """--out a link to nothing, or a link in a loop: the PNG replaced the link itself (the user's link
    was lost), and a loop in the folder was called "a link to X, which does not exist". Both are
    refused, naming the link, and left as they are; a link to an earlier plot is written through."""
    run = fake_run(tmp_path)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    assert cli.main(["plot", str(run), "--out", str(dangling)]) == 2
    err = capsys.readouterr().err
    assert f"--out {dangling} is a symbolic link to {tmp_path / 'nowhere.png'}, which does not exist" in err
    assert dangling.is_symlink() and not (tmp_path / "nowhere.png").exists()
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    assert cli.main(["plot", str(run), "--out", str(loop)]) == 2
    err = capsys.readouterr().err
    assert f"--out {loop} goes through a symbolic link loop ({loop}" in err and "does not exist" not in err
    assert loop.is_symlink()
    folder = tmp_path / "folder"
    folder.symlink_to(folder)
    assert cli.main(["plot", str(run), "--out", str(folder / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"symbolic link loop ({folder}" in err and "does not exist" not in err
    # the check of the folder (also export's and train's) calls it a loop too
    problem = write_problem(folder / "x.png")
    assert problem is not None and f"{folder} is a symbolic link loop" in problem
    # a link to a plot it drew: the plot is redrawn where the link points, and the link stays
    assert cli.main(["plot", str(run)]) == 0
    shown = tmp_path / "shown.png"
    shown.symlink_to(run / "logs" / "loss.png")
    before = (run / "logs" / "loss.png").stat().st_mtime_ns
    assert cli.main(["plot", str(run), "--out", str(shown)]) == 0
    assert shown.is_symlink() and (run / "logs" / "loss.png").stat().st_mtime_ns != before


def test_a_recipe_file_given_as_the_run_is_named(tmp_path: Path, capsys: pytest.CaptureFixture):
    """`plot r.yaml` (the recipe where its run directory belongs) spoke of writing r.yaml/logs/loss.png."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name_or_path: x\n")
    assert cli.main(["plot", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{recipe} is a recipe file, not a run directory" in err
    assert f"qlora-sft plan {recipe} --run-dir" in err and "logs/loss.png" not in err
    # with several runs too, and any other file given as a run
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    assert cli.main(["plot", str(fake_run(tmp_path)), str(notes)]) == 2
    assert f"{notes} is a file, not a run directory" in capsys.readouterr().err


def test_out_named_only_dot_png_suggests_a_name(tmp_path: Path, capsys: pytest.CaptureFixture):
    """`--out .png` suggested `.png.png`: a file needs a name before .png."""
    run = fake_run(tmp_path)
    assert cli.main(["plot", str(run), "--out", str(tmp_path / ".png")]) == 2
    err = capsys.readouterr().err
    assert ".png.png" not in err and f"(e.g. {tmp_path / 'loss.png'})" in err and "a name before .png" in err
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "curve.")]) == 2
    assert f"(e.g. {tmp_path / 'curve.png'})" in capsys.readouterr().err
