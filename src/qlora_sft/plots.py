"""Loss curves: `logs/loss.png` of a run (written while it trains), and `qlora-sft plot RUN ...`.

Reads logs/metrics.jsonl only, so it works on any run directory, finished or not, and the plot of a
resumed run shows each step once (the value logged last)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import atomic_write, is_no_space, jsonl_records, no_space_message

log = logging.getLogger("qlora_sft")

SOFTWARE = "qlora-sft plot"  # the PNG's Software text: a file `plot` may replace


class NothingLogged(UserError):
    """No run given to `draw` has logged a step yet: nothing is drawn, and nothing written."""


def series(run_dir: Path) -> dict[str, dict[int, float]]:
    """train loss, eval loss and learning rate by step (the last value logged for a step wins)."""
    metrics = run_dir / "logs" / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"plot: {run_dir} has no logs/metrics.jsonl (is it a qlora-sft run directory?)")
    out: dict[str, dict[int, float]] = {"loss": {}, "eval_loss": {}, "learning_rate": {}}
    unreadable = []
    for number, _, row in jsonl_records(metrics):
        try:
            if row is None:
                raise ValueError
            step = int(row["step"])
            values = {key: float(row[key]) for key in out if key in row}
        except (KeyError, ValueError, TypeError, OverflowError):  # OverflowError: a step of 1e400 (infinity)
            unreadable.append(number)
            continue
        for key, value in values.items():
            out[key][step] = value
    if unreadable:
        shown = ", ".join(map(str, unreadable[:5])) + (" ..." if len(unreadable) > 5 else "")
        log.warning(
            "plot: left out %d line(s) of %s that hold no step's metrics (line %s): cut off by a crash or a "
            "full disk, or edited",
            len(unreadable),
            metrics,
            shown,
        )
    return out


def draw(run_dirs: list[Path], out: Path) -> Path:
    """Train (solid) and eval (dashed, points) loss against step for each run; with one run, its
    learning rate on a second axis. Written with matplotlib's Agg backend (no display needed). A run
    that has logged no step yet is left out, with a warning; with none left, NothingLogged."""
    several = len(run_dirs) > 1
    drawn, empty = [], []
    for run_dir in run_dirs:  # every run is read first: one that is no run is refused before anything is drawn
        s = series(run_dir)
        (drawn if s["loss"] or s["eval_loss"] or (not several and s["learning_rate"]) else empty).append((run_dir, s))
    if not drawn:
        files = ", ".join(str(run_dir / "logs" / "metrics.jsonl") for run_dir, _ in empty)
        raise NothingLogged(
            f"plot: {files} {'hold' if several else 'holds'} no logged step yet (a run logs its loss every "
            "train.logging_steps optimizer steps); nothing was written. Plot again once "
            f"{'one' if several else 'it'} has."
        )
    for run_dir, _ in empty:
        log.warning(
            "plot: %s holds no logged step yet; %s is left out of the plot", run_dir / "logs" / "metrics.jsonl", run_dir
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    lr_axis: Any = None
    for i, (run_dir, s) in enumerate(drawn):
        color = f"C{i}"
        name = run_dir.name if several else "train"
        if s["loss"]:
            ax.plot(sorted(s["loss"]), [s["loss"][k] for k in sorted(s["loss"])], color=color, label=f"{name} loss")
        if s["eval_loss"]:
            steps = sorted(s["eval_loss"])
            label = f"{run_dir.name} eval loss" if several else "eval loss"
            ax.plot(steps, [s["eval_loss"][k] for k in steps], "o--", color=color, label=label)
        if not several and s["learning_rate"]:
            lr_axis = ax.twinx()
            steps = sorted(s["learning_rate"])
            lr_axis.plot(steps, [s["learning_rate"][k] for k in steps], color="grey", alpha=0.5, label="learning rate")
            lr_axis.set_ylabel("learning rate")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr_axis is not None:
        more = lr_axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(", ".join(run_dir.name for run_dir, _ in drawn))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png", metadata={"Software": SOFTWARE}))
    except OSError as exc:
        if is_no_space(exc):
            raise UserError(f"plot: writing {out}: {no_space_message(out.parent, exc)}; nothing was written") from None
        raise
    finally:
        plt.close(fig)
    return out


def drawn_here(png: Path) -> bool:
    """Whether `png` is a plot qlora-sft drew (its PNG names qlora-sft as the software that made it), or
    a run's own logs/loss.png (drawn by versions that named nothing): one `plot` may replace."""
    if png.parent.name == "logs" and png.name == "loss.png" and (png.parent / "metrics.jsonl").is_file():
        return True
    from PIL import Image

    try:
        with Image.open(png) as im:
            return im.format == "PNG" and im.info.get("Software") == SOFTWARE
    except Exception:  # not an image, or one PIL cannot read: not ours
        return False


def loss_plot_callback(run_dir: Path) -> Any:
    """Main process: redraw logs/loss.png after every checkpoint, every evaluation (the final one
    comes after training) and at the end of training."""
    from transformers import TrainerCallback

    class LossPlot(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.draw()

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.draw()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.draw()

        def draw(self) -> None:
            if not (run_dir / "logs" / "metrics.jsonl").is_file():
                return
            try:
                draw([run_dir], run_dir / "logs" / "loss.png")
            except NothingLogged:  # a checkpoint saved before the first logged step: drawn at the next one
                return
            except Exception as exc:  # a picture never stops training
                log.warning("logs/loss.png not drawn: %s", exc)

    return LossPlot()
